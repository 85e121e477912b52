"""Capture from images: encode, noise at each t and seed, one forward per batch with early exit."""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffdissect.capture.hooks import LayerRecorder
from diffdissect.capture.layers import resolve_layers
from diffdissect.capture.rows import cast_checked, to_rows
from diffdissect.capture.spec import CaptureConfig
from diffdissect.data.sources import ImageRecord, ImageSource, UnreadableInput
from diffdissect.data.transforms import to_model_pixels
from diffdissect.distributed import SINGLE, Dist
from diffdissect.errors import DataError, DiffdissectError, SpecError
from diffdissect.lock import DirectoryLock
from diffdissect.models.identity import comparable
from diffdissect.models.noising import noise_for
from diffdissect.models.target import Target
from diffdissect.store.manifest import MANIFEST, Manifest, slice_key, spec_digest
from diffdissect.store.writer import StoreWriter, check_store_directory


def recorded_model(out: str | Path) -> dict[str, Any] | None:
    """The model identity a store already records (its digest is reused when the model files are unchanged)."""
    try:
        return Manifest.load(Path(out)).model if (Path(out) / MANIFEST).is_file() else None
    except Exception:  # a damaged manifest is reported by the writer, with its reason
        return None


def split_location(identity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what must agree on resume, where it was read from): paths never decide whether data may be mixed."""
    where_keys = {"path", "csv"} | ({"name"} if identity.get("fingerprint") else set())
    return (
        {k: v for k, v in identity.items() if k not in where_keys},
        {k: v for k, v in identity.items() if k in where_keys},
    )


def record_truncations(target: Target, writer: StoreWriter) -> None:
    """Prompts longer than the tokenizer's limit were cut: say so once, and record where in the manifest."""
    if not target.truncated_prompts:
        return
    notes = writer.manifest.notes.setdefault("truncated_prompts", {})
    new = {p: v for p, v in target.truncated_prompts.items() if p not in notes}
    notes.update(new)
    for prompt, info in new.items():
        warnings.warn(
            f"prompt {prompt[:60]!r}... has {info['tokens']} tokens; the text encoder saw only the first "
            f"{info['kept']} (recorded in manifest.json notes.truncated_prompts)",
            stacklevel=3,
        )


def capture(
    target: Target,
    source: ImageSource,
    spec: CaptureConfig,
    out: str | Path,
    *,
    progress: bool = True,
    dist: Dist = SINGLE,
) -> Manifest:
    """Capture `spec.layers` x `spec.timesteps` x `spec.seeds` for every input into the store `out`.

    Running the same call again on an interrupted store resumes it; a store made with another spec
    is refused. Returns the completed manifest. Distributed (`dist` from torchrun/accelerate), rank r
    captures the input chunks k with k mod world = r into the same store; the manifest is merged when
    every rank has finished, and the store holds the same shards a single process writes.
    """
    spec.validate()
    layers = resolve_layers(target, spec.layers)
    _check_conditioning(target, spec)
    apply_guidance_embedding(target, spec.guidance_embedding)
    levels = target.noise_levels(None if spec.sigmas else spec.timesteps, spec.sigmas)
    table = [level.to_json() for level in levels]
    if not target.is_latent and target.pixel_channels != 3:
        raise SpecError(
            f"{target.source} takes {target.pixel_channels}-channel inputs and has no VAE, so it "
            "cannot be fed RGB images; load the full pipeline directory instead."
        )
    count = len(source) if spec.limit is None else min(len(source), spec.limit)
    shapes = probe_row_shapes(target, layers, spec, levels[0].t)
    shard_size = spec.shard_size or auto_shard_size(shapes, spec, len(levels))
    if dist.is_main:  # the other ranks join rank 0's store (StoreWriter.open): checking here would race its writes
        check_store_directory(out)
    lock = DirectoryLock(out, "capture") if dist.is_main else contextlib.nullcontext()
    with lock:
        identity = target.identity(known=recorded_model(out))
        source_identity, source_where = split_location(source.identity())
        spec_json = {
            "capture": spec.data_fields(),
            "source": source_identity,
            "shard_size": shard_size,
            "model": comparable(identity),
        }
        manifest = Manifest(
            mode="images",
            spec=spec_json,
            spec_hash=spec_digest(spec_json),
            model=identity,
            timesteps=table,
            layers={l: {"shape": list(shapes[l]), "dtype": spec.dtype} for l in layers},
            dtype=spec.dtype,
            locations={"source": source_where, "model": identity.get("source")},
        )
        writer = StoreWriter.open(out, manifest, dist)
        return _capture_chunks(
            target, source, spec, layers, shapes, shard_size, count, writer, out, progress, dist, levels
        )


def _capture_chunks(
    target: Target,
    source: ImageSource,
    spec: CaptureConfig,
    layers: list[str],
    shapes: dict[str, tuple[int, ...]],
    shard_size: int,
    count: int,
    writer: StoreWriter,
    out: str | Path,
    progress: bool,
    dist: Dist,
    levels: Any,
) -> Manifest:
    recorder = LayerRecorder(target.denoiser, layers, early_exit=spec.early_exit)
    desc = f"capture (rank {dist.rank}/{dist.world_size})" if dist.enabled else "capture"
    with recorder, tqdm(total=count, unit="img", desc=desc, disable=not progress or not dist.is_main) as bar:
        for chunk, start in enumerate(range(0, count, shard_size)):
            stop = min(start + shard_size, count)
            if dist.owns(chunk) and not writer.is_committed(chunk):
                tensors, rows, skipped = capture_chunk(
                    target, source, range(start, stop), spec, layers, shapes, recorder, levels
                )
                writer.write_shard(chunk, tensors, rows, (start, stop), skipped)
            bar.update(stop - start)
    record_truncations(target, writer)
    if not dist.enabled:
        _check_any_rows(writer.manifest, count, out)  # before the store is marked complete
    manifest = writer.finalize(count)
    _check_any_rows(manifest, count, out)  # distributed: once the ranks' lists are merged
    return manifest


def _check_any_rows(manifest: Manifest, count: int, out: str | Path) -> None:
    if manifest.rows == 0:
        raise DataError(
            f"none of the {count} inputs could be read ({len(manifest.skipped)} skipped); "
            f"see {Path(out) / 'manifest.json'} for the reasons."
        )


capture_images = capture  # the exported name, beside capture_trajectories (`diffdissect.capture_images`)


def capture_chunk(
    target: Target,
    source: ImageSource,
    indices: range,
    spec: CaptureConfig,
    layers: list[str],
    shapes: dict[str, tuple[int, ...]],
    recorder: LayerRecorder,
    levels: list[Any] | None = None,
):
    """Capture one shard's worth of inputs. Returns (tensors by slice key, rows, skipped inputs)."""
    levels = levels if levels is not None else target.noise_levels(spec.timesteps)
    records, skipped = load_records(source, indices)
    n, n_seeds = len(records), len(spec.seeds)
    tensors = {
        slice_key(layer, level.t): torch.empty((n, n_seeds, *shapes[layer]), dtype=spec.torch_dtype)
        for layer in layers
        for level in levels
    }
    if records:
        ids = [r.input_id for r in records]
        pixels = torch.stack([to_model_pixels(r.image, target.resolution) for r in records])
        x0 = torch.cat([target.encode_images(pixels[b : b + spec.batch_size]) for b in range(0, n, spec.batch_size)])
        prompts, classes = _conditioning_inputs(target, records, spec)
        for s, seed in enumerate(spec.seeds):
            noise = noise_for(ids, seed, tuple(x0.shape[1:]))
            for level in levels:
                t = level.t
                x_t = level.apply(x0, noise)  # the family's forward process (models.levels)
                for b in range(0, n, spec.batch_size):
                    sl = slice(b, b + spec.batch_size)
                    batch = x_t[sl]
                    cond = target.conditioning(
                        prompts[sl] if prompts else None, classes[sl] if classes else None, len(batch)
                    )
                    steps = target.timestep_argument(level, len(batch))
                    with torch.no_grad():
                        outputs = recorder.run(target.forward, batch, steps, cond)
                    for layer in layers:
                        rows = cast_checked(
                            layer_rows(target, layer, outputs[layer], spec), spec.torch_dtype, layer, t, ids[sl]
                        )
                        tensors[slice_key(layer, t)][sl, s] = rows.cpu()
    tensors = {k: v.reshape(n * n_seeds, *v.shape[2:]) for k, v in tensors.items()}
    rows = [
        {
            "input_id": r.input_id,
            "source_index": r.source_index,
            "seed": seed,
            "label": _plain(r.label),
            "caption": r.caption,
            **{k: _plain(v) for k, v in r.attributes.items()},
            **({"image_sha256": r.content_sha256} if r.content_sha256 else {}),
        }
        for r in records
        for seed in spec.seeds
    ]
    return tensors, rows, skipped


def load_records(source: ImageSource, indices: range) -> tuple[list[ImageRecord], list[dict[str, Any]]]:
    """Load inputs; unreadable ones are skipped with a warning and returned as `skipped`."""
    records, skipped = [], []
    for i in indices:
        try:
            records.append(source.load(i))
        except UnreadableInput as exc:
            warnings.warn(f"skipping unreadable input {exc}", stacklevel=2)
            skipped.append({"source_index": i, "reason": str(exc)})
    return records, skipped


@torch.no_grad()
def probe_row_shapes(
    target: Target, layers: list[str], spec: CaptureConfig, t: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Per-row stored shape of each layer, from one dry forward of a single sample.

    The forward runs on the meta device (shapes only, no arithmetic: free even for SD-XL); a model
    that cannot run on meta falls back to a real single-sample forward.
    """
    sample, timestep, cond = target.dry_inputs(spec.timesteps[0] if t is None else t)
    with LayerRecorder(target.denoiser, layers, early_exit=True) as recorder:
        try:
            outputs = recorder.run(_meta_forward, target, sample, timestep, cond)
        except DiffdissectError:  # a wrong layer spec (no text stream, @update on a shape change)
            raise
        except Exception:  # an op without a meta kernel, a data-dependent branch, ...
            outputs = recorder.run(target.forward, sample, timestep, cond)
    return {layer: tuple(layer_rows(target, layer, outputs[layer], spec).shape[1:]) for layer in layers}


def layer_rows(target: Target, layer: str, output: torch.Tensor, opts: Any) -> torch.Tensor:
    """Stored rows of one captured tensor: the family's own token grid first (FLUX's packed output)."""
    if opts.tokens_to_grid and output.ndim == 3 and target.family is not None:
        grid = target.family.to_grid(target, layer, output)  # shape maths only: runs on meta too
        if grid is not None:
            output = grid
    return to_rows(output, opts)


def apply_guidance_embedding(target: Target, value: float | None) -> None:
    """Set FLUX-dev's guidance embedding value (refused for every other model)."""
    if value is None:
        return
    if target.family is None or target.family.name != "FLUX":
        raise SpecError(
            "--guidance-embedding is for guidance-distilled FLUX models only; this model's guidance is "
            "classifier-free (trajectories: --guidance)."
        )
    target.family.guidance_embedding = float(value)
    target._prompt_cache.clear()
    target.family.guidance_value(target)  # refuses a model without a guidance embedding (schnell)


def _meta_forward(target: Target, sample: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> Any:
    def meta(x: Any) -> Any:  # nested too: SDXL's added_cond_kwargs is a dict of tensors
        if isinstance(x, torch.Tensor):
            return x.to("meta")
        if isinstance(x, dict):
            return {k: meta(v) for k, v in x.items()}
        return x

    state = {
        name: torch.empty_like(v, device="meta")
        for name, v in [*target.denoiser.named_parameters(), *target.denoiser.named_buffers()]
    }
    args, kwargs = target.call_arguments(meta(sample), meta(t), {k: meta(v) for k, v in cond.items()})
    return torch.func.functional_call(target.denoiser, state, args, kwargs)


def auto_shard_size(shapes: dict[str, tuple[int, ...]], spec: CaptureConfig, n_levels: int | None = None) -> int:
    """Inputs per shard so that one shard holds about `spec.shard_mb` megabytes."""
    n_levels = len(spec.timesteps) if n_levels is None else n_levels
    per_input = sum(math.prod(s) for s in shapes.values()) * n_levels * len(spec.seeds)
    per_input *= spec.torch_dtype.itemsize
    return max(1, int(spec.shard_mb * 2**20 // max(per_input, 1)))


def _check_conditioning(target: Target, spec: CaptureConfig) -> None:
    if (spec.prompt is not None or spec.use_captions) and not target.takes_text:
        raise SpecError(f"{target.source} is not text-conditioned; drop --prompt/--use-captions.")
    if (spec.class_label is not None or spec.labels_as_classes) and not target.takes_class:
        raise SpecError(f"{target.source} is not class-conditional; drop --class-label/--labels-as-classes.")


def _conditioning_inputs(target: Target, records: list[ImageRecord], spec: CaptureConfig):
    prompts = classes = None
    if spec.prompt is not None:
        prompts = [spec.prompt] * len(records)
    elif spec.use_captions:
        prompts = [r.caption or "" for r in records]
    if spec.class_label is not None:
        classes = [spec.class_label] * len(records)
    elif spec.labels_as_classes:
        classes = [class_id(target, r.label) for r in records]
    return prompts, classes


def class_id(target: Target, label: Any) -> int:
    """A class id from an int-like label or a class name in the model's id2label."""
    if label is None or label == "":
        raise DataError("an input has no label, but --labels-as-classes needs one for every input.")
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
        return int(label)
    names = {v: k for k, v in target.id2label.items()}
    if label in names:
        return names[label]
    raise DataError(f"label {label!r} is neither a class id nor a class name of this model.")


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
