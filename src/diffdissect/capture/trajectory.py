"""Trajectory mode: run the pipeline's own sampler on prompts and capture layers at every step.

Rows are (prompt, seed) pairs; slices are keyed by the training timestep t of each denoiser call.
For flow-matching models (SD3, FLUX, Sana) each step's sigma is read from the scheduler's own schedule
and keyed by the training index derived from it (models.levels), never by rounding the denoiser's
argument (FLUX is handed sigma in [0, 1]); the table records the exact argument and sigma.
Under classifier-free guidance the denoiser sees a doubled batch, unconditional half first (SD, SDXL,
SD3, PixArt, Sana; DiT: conditional first); `spec.branch` picks the conditional (default) or
unconditional half. FLUX has no guidance batch: its guidance is an embedding (dev) or absent (schnell). A sampler that calls the denoiser twice at the same t
(PNDM's warm-up) keeps the first call; the manifest records how many calls were dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffdissect.atomic import atomic_write_bytes
from diffdissect.capture.engine import layer_rows, record_truncations, recorded_model
from diffdissect.capture.hooks import LayerRecorder
from diffdissect.capture.layers import resolve_layers
from diffdissect.capture.rows import cast_checked
from diffdissect.capture.spec import TrajectoryConfig
from diffdissect.data.transforms import unit_to_uint8
from diffdissect.errors import SpecError
from diffdissect.lock import DirectoryLock
from diffdissect.models.identity import comparable
from diffdissect.models.noising import timestep_table
from diffdissect.models.target import Target
from diffdissect.store.manifest import IMAGES_DIR, Manifest, slice_key, spec_digest
from diffdissect.store.writer import StoreWriter, check_store_directory


def capture_trajectories(target: Target, spec: TrajectoryConfig, out: str | Path, *, progress: bool = True) -> Manifest:
    """Sample every prompt x seed and store the chosen layers at every denoising step (resumable)."""
    spec.validate()
    if target.pipeline is None:
        raise SpecError("trajectory mode needs a full pipeline (model_index.json), not a bare denoiser.")
    layers = resolve_layers(target, spec.layers)
    if hasattr(target.pipeline, "set_progress_bar_config"):
        target.pipeline.set_progress_bar_config(disable=True)  # one bar for the whole capture
    conditions = [_condition(target, p) for p in spec.prompts]
    pairs = [(i, seed) for i in range(len(spec.prompts)) for seed in spec.seeds]
    if spec.branch == "uncond" and target.family is not None and not target.family.cfg_halves():
        raise SpecError(
            f"{target.family.name} has no unconditional branch to keep: its guidance is an embedding, "
            "not a classifier-free batch. Drop --branch uncond."
        )
    if target.takes_text and target.tokenizer is not None:
        target.note_truncation(list(spec.prompts))
    probe = _sample(target, spec, layers, [conditions[0]], [spec.seeds[0]], steps_only=True)
    schedule = probe["timesteps"]
    check_store_directory(out)
    with DirectoryLock(out, "capture (trajectories)"):
        identity = target.identity(known=recorded_model(out))
        spec_json = {"trajectory": spec.data_fields(), "model": comparable(identity)}
        manifest = Manifest(
            mode="trajectory",
            spec=spec_json,
            spec_hash=spec_digest(spec_json),
            model=identity,
            timesteps=probe["levels"] or timestep_table(target.scheduler, schedule),
            layers={l: {"shape": list(probe["shapes"][l]), "dtype": spec.dtype} for l in layers},
            dtype=spec.dtype,
            locations={"model": identity.get("source")},
        )
        writer = StoreWriter.open(out, manifest)
        return _sample_all(target, spec, layers, conditions, pairs, probe, writer, Path(out), progress)


def _sample_all(
    target: Target,
    spec: TrajectoryConfig,
    layers: list[str],
    conditions: list[Any],
    pairs: list[tuple[int, int]],
    probe: dict[str, Any],
    writer: StoreWriter,
    out: Path,
    progress: bool,
) -> Manifest:
    images_dir = out / IMAGES_DIR
    images_dir.mkdir(exist_ok=True)
    with tqdm(total=len(pairs), unit="sample", desc="trajectories", disable=not progress) as bar:
        for chunk, start in enumerate(range(0, len(pairs), spec.shard_size)):
            part = pairs[start : start + spec.shard_size]
            if not writer.is_committed(chunk):
                tensors: dict[str, list[torch.Tensor]] = {}
                rows: list[dict[str, Any]] = []
                for b in range(0, len(part), spec.batch_size):
                    batch = part[b : b + spec.batch_size]
                    result = _sample(target, spec, layers, [conditions[i] for i, _ in batch], [s for _, s in batch])
                    for key, value in result["tensors"].items():
                        tensors.setdefault(key, []).append(value)
                    for (i, seed), image in zip(batch, result["images"]):
                        name = f"p{i:06d}-s{seed}.png"
                        if spec.save_images:
                            atomic_write_bytes(images_dir / name, _png(image))
                        rows.append(
                            {
                                "input_id": f"p{i:06d}",
                                "source_index": i,
                                "seed": seed,
                                "label": None,
                                "caption": spec.prompts[i],
                                "image": f"{IMAGES_DIR}/{name}" if spec.save_images else None,
                            }
                        )
                writer.write_shard(
                    chunk, {k: torch.cat(v) for k, v in tensors.items()}, rows, (start, start + len(part)), []
                )
            bar.update(len(part))
    writer.manifest.notes["dropped_duplicate_calls"] = probe["dropped"]
    record_truncations(target, writer)
    return writer.finalize(len(pairs))


def _condition(target: Target, prompt: str) -> Any:
    if target.kind == "dit":
        if prompt.strip().isdigit():
            target.check_class_ids([int(prompt)])
            return int(prompt)
        names = {v: k for k, v in target.id2label.items()}
        if prompt not in names:
            raise SpecError(
                f"{prompt!r} is not a class of this DiT pipeline; use class ids or names such as {list(names)[:5]}."
            )
        return names[prompt]
    if not target.takes_text:
        raise SpecError("trajectory mode supports text-to-image (SD-like) and DiT-like pipelines.")
    return prompt


@torch.no_grad()
def _sample(
    target: Target,
    spec: TrajectoryConfig,
    layers: list[str],
    conditions: list[Any],
    seeds: list[int],
    steps_only: bool = False,
) -> dict[str, Any]:
    """One pipeline call for a batch; returns per-(layer, t) tensors, images, the schedule and shapes."""
    pipe = target.pipeline
    seen_t: list[float] = []
    pre = target.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: seen_t.append(_timestep_value(args, kwargs)), with_kwargs=True
    )
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    kwargs: dict[str, Any] = {
        "num_inference_steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "generator": generators,
        "output_type": "np",
    }
    if target.kind == "dit":
        kwargs["class_labels"] = conditions
    else:
        kwargs["prompt"] = conditions
    if target.family is not None:
        kwargs.update(target.family.pipeline_kwargs(target))
    try:
        with LayerRecorder(target.denoiser, layers, early_exit=False, keep_all_calls=True) as recorder:
            images = pipe(**kwargs).images
    finally:
        pre.remove()
    n = len(conditions)
    keys, levels = _step_keys(target, seen_t)
    keep = [i for i, t in enumerate(keys) if t not in keys[:i]]
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in layers:
        for call in keep:
            rows = layer_rows(target, layer, _branch(target, recorder.calls[layer][call], n, spec.branch), spec)
            shapes[layer] = tuple(rows.shape[1:])
            if not steps_only:
                t = keys[call]
                out[slice_key(layer, t)] = cast_checked(
                    rows, spec.torch_dtype, layer, t, [str(c) for c in conditions]
                ).cpu()
    return {
        "tensors": out,
        "images": np.asarray(images),
        "timesteps": [keys[i] for i in keep],
        "levels": [levels[i] for i in keep] if levels else None,
        "shapes": shapes,
        "dropped": len(seen_t) - len(keep),
    }


def _step_keys(target: Target, seen: list[float]) -> tuple[list[int], list[dict[str, Any]] | None]:
    """Training index of every denoiser call, and (flow models) each call's full noise level.

    DDPM family: the denoiser is handed the integer training index itself. Flow matching: the call's
    argument is matched to the scheduler's own timestep schedule of this sampling run, which gives the
    step's exact sigma; the key is the training index of that sigma.
    """
    from diffdissect.models.levels import flow_schedule, process_of

    if process_of(target.scheduler) != "flow":
        return [int(round(t)) for t in seen], None
    flow = target.family.flow(target) if target.family is not None else flow_schedule(target.scheduler)
    timesteps = torch.as_tensor(target.scheduler.timesteps, dtype=torch.float64).cpu() * flow.scale
    sigmas = torch.as_tensor(target.scheduler.sigmas, dtype=torch.float64).cpu()
    keys, levels = [], []
    for value in seen:
        step = int(torch.argmin((timesteps - value).abs()))
        sigma = float(sigmas[step])
        level = flow.level(flow.index_of(sigma), sigma=sigma, denoiser_t=float(value))
        keys.append(level.t)
        levels.append(level.to_json())
    distinct = {(k, lv["sigma"]) for k, lv in zip(keys, levels)}
    if len({k for k, _ in distinct}) != len(distinct):
        raise SpecError(
            f"two sampling steps fall on the same training index ({sorted(keys)}); use fewer --steps "
            f"(at most {flow.n})."
        )
    return keys, levels


def _branch(target: Target, output: torch.Tensor, n: int, branch: str) -> torch.Tensor:
    if output.shape[0] == n:
        return output
    if output.shape[0] != 2 * n:
        raise RuntimeError(f"unexpected denoiser batch {output.shape[0]} for {n} samples.")
    cond_first = target.cfg_cond_first
    first = (branch == "cond") == cond_first
    return output[:n] if first else output[n:]


def _timestep_value(args: tuple, kwargs: dict) -> float:
    """The timestep argument of one denoiser call, as handed over (rounded nowhere)."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor):
        t = t.flatten()[0].item()
    return float(t)


def _png(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(unit_to_uint8(image)).save(buffer, format="PNG")
    return buffer.getvalue()
