"""Where directions come from, named with one syntax, and the edit specs that use them.

A source is `KIND:PATH[#SELECTOR]`:

    directions:RUN#red         a word direction of a `directions run` (its directions/<layer>.safetensors),
                               one per sampled t; `#red@t=981` pins the direction of one step, `#red@pool`
                               averages the map over locations (one vector added at every location)
    probe:DIR#colour=red       a linear probe's class weights, as `diffdissect probe` writes them
                               (DIR/probe_weights.safetensors, key `<label>/<layer>/t=<t>`, one row per class
                               in probe_weights.json): the class's row minus the mean row; `@t=N` picks t
    sae:DIR#12                 decoder row 12 of an SAE (diffdissect, sparsify or SAELens layout)
    file:PATH[#key]            a plain vector in a .npy or .safetensors file (bare paths ending so work too)
    random:SEED[#map]          a seeded Gaussian direction (the control); `#map` spans the whole layer map
    mean:STORE                 the per-t mean of the layer in an activation store (for mean ablation)

An edit is `KIND@LAYER=SOURCE[,SOURCE...][;option...]`, and edits joined by `|` compose (left first):

    add@mid_block=directions:runs/d#red;steps=0:9
    erase@mid_block=sae:runs/sae#3,5
    sae-zero@up_blocks.1.attentions.1=runs/sae#3,5,7        (also sae-set, sae-scale; ;value=V fixes the amount)
    mean@mid_block=mean:stores/traj;t=500:999;box=0:4,0:8

Options: `steps=A:B` (step indices, inclusive, 0 = first), `t=LO:HI` (training timesteps, inclusive),
`box=Y0:Y1,X0:X1` (grid cells, half-open, on the layer's grid), `mask=PATH` (.npy/.safetensors weights
on the layer's grid), `value=V` (SAE edits), `scale=raw` (add: alpha times the stored direction, not
alpha x the layer's norm x a unit direction).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from diffdissect.errors import DataError, SpecError
from diffdissect.intervene.edits import (
    SAE_OPS,
    AddEdit,
    Direction,
    Edit,
    EraseEdit,
    MeanEdit,
    SAEEdit,
    Window,
    fit_to_layer,
    layer_grid,
    locations_and_width,
)
from diffdissect.models.identity import check_same_model

SOURCE_KINDS = ("directions", "probe", "sae", "file", "random", "mean")
EDIT_KINDS = ("add", "erase", "mean", *(f"sae-{op}" for op in SAE_OPS))
OPTIONS = ("steps", "t", "box", "mask", "value", "scale")


@dataclass
class EditSpec:
    """One parsed edit, not yet bound to a model."""

    kind: str
    layer: str
    sources: list[str]
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""


def parse_edits(text: str) -> list[EditSpec]:
    """`a | b | c` -> the edit specs, in order. Raises SpecError with the grammar on a malformed spec."""
    parts = [p.strip() for p in text.split("|")]
    if not text.strip() or any(not p for p in parts):
        raise SpecError(f"empty edit in {text!r}; write KIND@LAYER=SOURCE[;option...], edits joined by '|'.")
    return [parse_edit(p) for p in parts]


def parse_edit(text: str) -> EditSpec:
    head, _, rest = text.partition("=")
    kind, at, layer = head.partition("@")
    kind, layer = kind.strip(), layer.strip()
    if kind not in EDIT_KINDS:
        raise SpecError(f"unknown edit kind {kind!r} in {text!r}; kinds: {', '.join(EDIT_KINDS)}.")
    if not at or not layer or not rest:
        raise SpecError(
            f"malformed edit {text!r}; write KIND@LAYER=SOURCE[;option...], e.g. add@mid_block=directions:runs/d#red."
        )
    source_text, *option_texts = rest.split(";")
    options: dict[str, str] = {}
    for item in option_texts:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in OPTIONS:
            raise SpecError(f"unknown edit option {item!r} in {text!r}; options: {', '.join(OPTIONS)} (as key=value).")
        options[key] = value.strip()
    return EditSpec(kind, layer, _split_sources(source_text.strip()), options, text.strip())


def _split_sources(text: str) -> list[str]:
    """Comma-separated sources; a bare number continues the previous source's selector (`sae:d#3,5`)."""
    out: list[str] = []
    for piece in text.split(","):
        piece = piece.strip()
        if out and re.fullmatch(r"-?\d+", piece):
            out[-1] += "," + piece
        elif piece:
            out.append(piece)
    if not out:
        raise SpecError(f"an edit needs a source after '=' (got {text!r}).")
    return out


# ---- sources ------------------------------------------------------------------------------------------------
def split_source(text: str) -> tuple[str, str, str | None]:
    """`kind:path#selector` -> (kind, path, selector). Bare .npy/.safetensors paths are `file:`."""
    kind, colon, rest = text.partition(":")
    if not colon or kind not in SOURCE_KINDS:
        if text.split("#")[0].endswith((".npy", ".safetensors")):
            kind, rest = "file", text
        else:
            raise SpecError(
                f"unknown direction source {text!r}; write KIND:PATH[#SELECTOR] with KIND one of "
                f"{', '.join(SOURCE_KINDS)} (see `diffdissect steer --help`)."
            )
    path, _, selector = rest.partition("#")
    return kind, path, selector or None


def _pinned(selector: str | None) -> tuple[str | None, int | None]:
    if selector and selector.endswith("@pool"):
        selector = selector[: -len("@pool")]
    if selector and "@t=" in selector:
        name, _, t = selector.partition("@t=")
        if not t.isdigit():
            raise SpecError(f"@t= needs an integer timestep, not {t!r}.")
        return name, int(t)
    return selector, None


# the target's identity: a dict, or a callable given the recorded identity (so that the target reuses its recorded
# digest when its files are unchanged, and hashes only when a check needs it); None: no model check
ModelIdentity = dict[str, Any] | Callable[[dict[str, Any] | None], dict[str, Any]] | None


def check_model(text: str, recorded: dict[str, Any] | None, model_identity: ModelIdentity, what: str) -> None:
    """Refuse a source made from another model than the target (dtype-aware: see `models.identity.model_mismatch`)."""
    if model_identity is None or not recorded:
        return
    current = model_identity(recorded) if callable(model_identity) else model_identity
    check_same_model(recorded, current, f"{text}: {what}", "use one made from this model.", SpecError)


def load_direction(text: str, layer: str, out_shape: Sequence[int], model_identity: ModelIdentity = None) -> Direction:
    """The direction `text` names for `layer` (per-sample output shape `out_shape`), checked for width, finite
    values and (given `model_identity`) the model its run or store recorded."""
    kind, path, selector = split_source(text)
    if kind == "directions":
        return _word_direction(text, Path(path), selector, layer, out_shape, model_identity)
    if kind == "probe":
        return _probe_direction(text, Path(path), selector, layer, out_shape, model_identity)
    if kind == "sae":
        loaded, latents = load_sae_source(text, layer, out_shape, model_identity)
        if len(latents) != 1:
            raise SpecError(f"{text}: a direction is one decoder row; name one latent (#J).")
        row = loaded.sae.W_dec.detach()[latents[0]].float()
        return Direction(text, vector=fit_to_layer(text, row, layer, out_shape))
    if kind == "file":
        return Direction(text, vector=fit_to_layer(text, _vector_file(Path(path), selector), layer, out_shape))
    if kind == "random":
        return _random(text, path, selector, layer, out_shape)
    if kind == "mean":
        return _store_mean(text, Path(path), layer, out_shape, model_identity)
    raise SpecError(f"unknown direction source {text!r}.")


def _word_direction(
    text: str, run: Path, selector: str | None, layer: str, shape: Sequence[int], model_identity: ModelIdentity = None
) -> Direction:
    term, pinned = _pinned(selector)
    terms_path, file = run / "directions" / "terms.json", run / "directions" / f"{layer}.safetensors"
    if not terms_path.is_file():
        raise DataError(
            f"{text}: {run} holds no directions ({terms_path} missing); run `diffdissect directions run` "
            "with saved directions first."
        )
    check_model(
        text,
        _recorded_model(text, run / "trajectories", model_identity),
        model_identity,
        "the directions were computed from",
    )
    if not file.is_file():
        have = sorted(p.stem for p in (run / "directions").glob("*.safetensors"))
        raise SpecError(f"{text}: the directions run has no directions for layer {layer!r}; it has {have}.")
    terms = json.loads(terms_path.read_text())["terms"]
    if term not in terms:
        raise SpecError(f"{text}: term {term!r} is not among the run's terms ({', '.join(terms[:20])}).")
    row = terms.index(term)
    tensors = load_file(file)
    by_t = {int(k.split("=", 1)[1]): v[row].float() for k, v in tensors.items() if k.startswith("t=")}
    if selector and selector.endswith("@pool"):  # the map averaged over locations: one vector everywhere
        by_t = {
            t: fit_to_layer(text, v, layer, shape).reshape(-1, locations_and_width(shape)[1]).mean(0)
            for t, v in by_t.items()
        }
    if pinned is not None:
        if pinned not in by_t:
            raise SpecError(f"{text}: the run has no directions at t={pinned}; its steps: {sorted(by_t)}.")
        return Direction(text, vector=fit_to_layer(text, by_t[pinned], layer, shape))
    return Direction(text, by_t={t: fit_to_layer(text, v, layer, shape) for t, v in by_t.items()})


def _probe_direction(
    text: str, run: Path, selector: str | None, layer: str, shape: Sequence[int], model_identity: ModelIdentity = None
) -> Direction:
    choice, pinned = _pinned(selector)
    if not choice or "=" not in choice:
        raise SpecError(f"{text}: name the probe's label and class as #LABEL=VALUE (e.g. #colour=red).")
    label, _, value = choice.partition("=")
    index_path, file = run / "probe_weights.json", run / "probe_weights.safetensors"
    if not index_path.is_file() or not file.is_file():
        raise DataError(
            f"{text}: {run} holds no probe weights (probe_weights.json/.safetensors); run "
            "`diffdissect probe` again with this version to save them."
        )
    index = json.loads(index_path.read_text())
    if model_identity is not None and "model" not in index:
        warnings.warn(
            f"{text}: the probe weights record no model (written before this check existed); "
            "they could not be checked against the model being steered.",
            stacklevel=2,
        )
    check_model(text, index.get("model"), model_identity, "the probes were trained on activations of")
    cells = [c for c in index["cells"] if c["label"] == label and c["layer"] == layer]
    if not cells:
        raise SpecError(
            f"{text}: no probe of label {label!r} at layer {layer!r}; probes: "
            f"{sorted({(c['label'], c['layer']) for c in index['cells']})}."
        )
    tensors = load_file(file)
    by_t = {}
    for cell in cells:
        if value not in cell["classes"]:
            raise SpecError(f"{text}: {value!r} is not a class of probe {label!r}; classes: {cell['classes']}.")
        rows = tensors[cell["key"]].float()
        direction = rows[cell["classes"].index(value)] - rows.mean(0)  # softmax ignores a shift shared by all
        by_t[int(cell["t"])] = fit_to_layer(text, direction, layer, shape)
    if pinned is not None:
        if pinned not in by_t:
            raise SpecError(f"{text}: no probe at t={pinned}; probed steps: {sorted(by_t)}.")
        return Direction(text, vector=by_t[pinned])
    if len(by_t) == 1:
        return Direction(text, vector=next(iter(by_t.values())))
    return Direction(text, by_t=by_t)


def _vector_file(path: Path, key: str | None) -> torch.Tensor:
    if not path.is_file():
        raise DataError(f"no vector file at {path}.")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {path} as a plain .npy array: {err}") from None
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).flatten()
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if key is None:
        if len(tensors) != 1:
            raise SpecError(f"{path} holds {len(tensors)} tensors ({sorted(tensors)[:10]}); pick one with #KEY.")
        key = next(iter(tensors))
    if key not in tensors:
        raise SpecError(f"{path} has no tensor {key!r}; it holds {sorted(tensors)[:10]}.")
    return tensors[key].float().flatten()


def _random(text: str, seed: str, selector: str | None, layer: str, shape: Sequence[int]) -> Direction:
    if not seed.isdigit():
        raise SpecError(f"{text}: random:SEED takes an integer seed.")
    if selector not in (None, "map"):
        raise SpecError(f"{text}: random:SEED takes no selector but #map.")
    n_loc, width = locations_and_width(shape)
    generator = torch.Generator().manual_seed(int(seed))
    vector = torch.randn(n_loc * width if selector == "map" else width, generator=generator)
    if selector == "map":
        return Direction(text, vector=vector.reshape(n_loc, width))
    return Direction(text, vector=vector)


def _store_mean(
    text: str, store_dir: Path, layer: str, shape: Sequence[int], model_identity: ModelIdentity = None
) -> Direction:
    from diffdissect.store import open_store

    reader = open_store(store_dir)
    check_model(text, reader.manifest.model, model_identity, "the store was captured from")
    if layer not in reader.manifest.layers:
        raise SpecError(f"{text}: the store has no layer {layer!r}; it has {sorted(reader.manifest.layers)}.")
    by_t = {}
    for t in reader.timesteps:
        values = torch.from_numpy(np.asarray(reader.load(layer, t, dtype="float32"))).mean(0)
        by_t[int(t)] = fit_to_layer(text, values, layer, shape)
    if len(by_t) == 1:
        return Direction(text, vector=next(iter(by_t.values())))
    return Direction(text, by_t=by_t)


def load_sae_source(text: str, layer: str, out_shape: Sequence[int], model_identity: ModelIdentity = None):
    """(LoadedSAE, latents) for `sae:DIR#J[,J...]` (or a bare DIR#J), checked against the layer (and model)."""
    from diffdissect.sae.foreign import load_any_sae

    _, path, selector = split_source(text) if text.startswith("sae:") else ("sae", *text.partition("#")[::2])
    if not selector:
        raise SpecError(f"{text}: name the latent(s) as #J or #J,K,...")
    try:
        latents = [int(j) for j in selector.split(",")]
    except ValueError:
        raise SpecError(f"{text}: latents must be integers, not {selector!r}.") from None
    loaded = load_any_sae(path, layer)
    _, width = locations_and_width(out_shape)
    if loaded.layer is not None and loaded.layer != layer:
        raise SpecError(
            f"{text}: the SAE was trained on layer {loaded.layer!r}, not {layer!r}; use an SAE of this "
            "layer (or edit the layer it was trained on)."
        )
    if loaded.sae.config.d_in != width:
        raise SpecError(
            f"{text}: the SAE takes inputs of width {loaded.sae.config.d_in}, but layer {layer!r} has "
            f"width {width} per location; it was trained on another layer or model."
        )
    if model_identity is not None and loaded.format == "diffdissect":
        _check_sae_model(text, loaded.info, model_identity, Path(path))
    bad = [j for j in latents if not 0 <= j < loaded.sae.config.n_latents]
    if bad:
        raise SpecError(f"{text}: latent(s) {bad} out of range; the SAE has {loaded.sae.config.n_latents} latents.")
    return loaded, latents


def _check_sae_model(text: str, info: dict[str, Any], model_identity: ModelIdentity, directory: Path) -> None:
    """Refuse an SAE whose training store was captured from another model.

    SAEs trained since this check record the model in their slice; older ones name their store, which is trusted
    only when it still holds what the SAE was trained on (its `store_identity`); otherwise the check cannot be
    made, and a warning says so."""
    slice_ = info.get("slice", {})
    recorded = slice_.get("model")
    if recorded is None:
        recorded = _sae_store_model(text, slice_, directory)
    check_model(text, recorded, model_identity, "the SAE was trained on activations of")


def _sae_store_model(text: str, slice_: dict[str, Any], directory: Path) -> dict[str, Any] | None:
    from diffdissect.store.manifest import Manifest

    named = Path(slice_.get("store", ""))
    candidates = [named] if named.is_absolute() else [named, directory / named, directory.parent / named]
    for store in candidates:
        if not (store / "manifest.json").is_file():
            continue
        manifest = Manifest.load(store)  # a corrupt manifest is an error, not a skipped check
        if slice_.get("store_identity") and manifest.content_identity() != slice_["store_identity"]:
            continue  # another capture now lives there: not the SAE's store
        return manifest.model
    warnings.warn(
        f"{text}: the SAE records no model and its store ({named}) is not found (or holds another "
        "capture now); it could not be checked against the model being steered.",
        stacklevel=3,
    )
    return None


def _recorded_model(text: str, store: Path, model_identity: ModelIdentity) -> dict[str, Any] | None:
    """The model a run's store recorded (None, with a warning, when the store is gone)."""
    from diffdissect.store.manifest import Manifest

    if model_identity is None:
        return None
    if not (store / "manifest.json").is_file():
        warnings.warn(
            f"{text}: {store} is gone, so the model these directions came from could not be checked "
            "against the model being steered.",
            stacklevel=3,
        )
        return None
    return Manifest.load(store).model


def check_direction(text: str, direction: Direction, *, zero_ok: bool = False) -> None:
    """Refuse non-finite values (and zero vectors, unless `zero_ok`) before any sampling."""
    entries = [(None, direction.vector)] if direction.vector is not None else list(direction.by_t.items())
    for t, vector in entries:
        where = "" if t is None else f" at t={t}"
        if not bool(torch.isfinite(vector).all()):
            raise SpecError(
                f"{text}: the direction {direction.name} holds non-finite values (NaN or inf){where}; "
                "recompute it or use another source."
            )
        if not zero_ok and not bool(vector.any()):
            raise SpecError(
                f"{text}: the direction {direction.name} is zero{where}, so it has no direction; use a nonzero one."
            )


def check_coverage(text: str, direction: Direction, window: Window, schedule: list[int]) -> None:
    """A per-t direction must hold every t the edit acts at on this schedule (checked before any sampling)."""
    if direction.vector is not None:
        return
    missing = [t for step, t in enumerate(schedule) if window.active(step, t) and t not in direction.by_t]
    if missing:
        raise SpecError(
            f"{text}: the direction {direction.name} holds t in {sorted(direction.by_t)}, but this "
            f"sampling visits t {missing} where the edit acts (schedule {schedule}); sample with the "
            "same --steps as the run that made it, pin one of its steps with @t=N, or narrow the edit "
            "with ;t=LO:HI or ;steps=A:B."
        )


def edit_directions(edit: Any) -> list[Direction]:
    """The directions an edit object holds (none for SAE edits)."""
    if isinstance(edit, AddEdit):
        return [edit.direction]
    if isinstance(edit, EraseEdit):
        return list(edit.directions)
    if isinstance(edit, MeanEdit):
        return [edit.mean]
    return []


# ---- binding ------------------------------------------------------------------------------------------------
def bind_edit(
    spec: EditSpec,
    out_shape: Sequence[int],
    schedule: list[int] | None,
    num_train_timesteps: int,
    model_identity: ModelIdentity = None,
) -> Edit:
    """The edit object of `spec` at its layer, with every check that needs the model: widths, the SAE's
    layer and model, the mask's grid, the step window against the schedule."""
    window = _window(spec, out_shape, schedule, num_train_timesteps)
    scale = spec.options.get("scale", "norm")
    if scale not in ("norm", "raw") or (scale == "raw" and spec.kind != "add"):
        raise SpecError(
            f"{spec.text}: scale=norm (alpha in units of the layer's typical norm) or scale=raw "
            "(alpha times the stored direction, add only)."
        )

    def direction(source: str, zero_ok: bool = False) -> Direction:
        found = load_direction(source, spec.layer, out_shape, model_identity)
        check_direction(spec.text, found, zero_ok=zero_ok)
        if schedule is not None:
            check_coverage(spec.text, found, window, schedule)
        return found

    if spec.kind == "add":
        if len(spec.sources) != 1:
            raise SpecError(f"{spec.text}: add takes one direction.")
        return AddEdit(spec.layer, direction(spec.sources[0]), window, raw=scale == "raw")
    if spec.kind == "erase":
        return EraseEdit(spec.layer, [direction(s) for s in _expand(spec.sources)], window)
    if spec.kind == "mean":
        if len(spec.sources) != 1:
            raise SpecError(f"{spec.text}: mean takes one source (mean:STORE or a vector file).")
        return MeanEdit(spec.layer, direction(spec.sources[0], zero_ok=True), window)
    op = spec.kind.split("-", 1)[1]
    if len(spec.sources) != 1:
        raise SpecError(f"{spec.text}: an SAE edit takes one SAE with its latents (DIR#J,K,...).")
    loaded, latents = load_sae_source(spec.sources[0], spec.layer, out_shape, model_identity)
    value = None
    if "value" in spec.options:
        if op == "zero":
            raise SpecError(f"{spec.text}: sae-zero takes no value.")
        try:
            value = float(spec.options["value"])
        except ValueError:
            raise SpecError(f"{spec.text}: value must be a number, not {spec.options['value']!r}.") from None
    return SAEEdit(spec.layer, loaded.sae, latents, op, value, window, name=spec.sources[0].split("#")[0])


def _expand(sources: list[str]) -> list[str]:
    """`sae:d#3,5` in an erase means two decoder rows."""
    out = []
    for s in sources:
        head, _, selector = s.partition("#")
        if head.startswith("sae:") and selector and "," in selector:
            out += [f"{head}#{j}" for j in selector.split(",")]
        else:
            out.append(s)
    return out


def _range(text: str, what: str, spec: EditSpec) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text) or re.fullmatch(r"\s*(\d+)\s*", text)
    if not match:
        raise SpecError(f"{spec.text}: {what} must be A:B (inclusive) or one integer, not {text!r}.")
    lo, hi = int(match.group(1)), int(match.group(match.lastindex or 1))
    if lo > hi:
        raise SpecError(f"{spec.text}: {what}={text} is empty (first > last).")
    return lo, hi


def _window(spec: EditSpec, out_shape: Sequence[int], schedule: list[int] | None, n_train: int) -> Window:
    window = Window()
    if "steps" in spec.options:
        window.steps = _range(spec.options["steps"], "steps", spec)
        if schedule is not None and window.steps[1] >= len(schedule):
            raise SpecError(
                f"{spec.text}: steps={spec.options['steps']} is outside the schedule of {len(schedule)} "
                f"steps (indices 0..{len(schedule) - 1})."
            )
    if "t" in spec.options:
        window.t_range = _range(spec.options["t"], "t", spec)
        if window.t_range[1] >= n_train:
            raise SpecError(f"{spec.text}: t={spec.options['t']} is outside the training schedule [0, {n_train}).")
        if schedule is not None and not any(window.t_range[0] <= t <= window.t_range[1] for t in schedule):
            raise SpecError(f"{spec.text}: no sampler step has t in {spec.options['t']}; the schedule's t: {schedule}.")
    if "box" in spec.options and "mask" in spec.options:
        raise SpecError(f"{spec.text}: give box or mask, not both.")
    if "box" in spec.options or "mask" in spec.options:
        grid = layer_grid(out_shape)
        if grid is None:
            raise SpecError(
                f"{spec.text}: layer {spec.layer!r} has no spatial grid (per-sample shape "
                f"{list(out_shape)}), so it takes no box or mask."
            )
        window.mask = _box(spec, grid) if "box" in spec.options else _mask_file(spec, grid)
        window.mask_text = f"box={spec.options['box']}" if "box" in spec.options else f"mask={spec.options['mask']}"
    return window


def _box(spec: EditSpec, grid: tuple[int, int]) -> torch.Tensor:
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*,\s*(\d+):(\d+)\s*", spec.options["box"])
    if not match:
        raise SpecError(f"{spec.text}: box must be Y0:Y1,X0:X1 in grid cells (half-open), not {spec.options['box']!r}.")
    y0, y1, x0, x1 = map(int, match.groups())
    h, w = grid
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise SpecError(
            f"{spec.text}: box {spec.options['box']} does not fit the layer's {h}x{w} grid "
            f"(rows 0..{h}, columns 0..{w}, first < last)."
        )
    mask = torch.zeros(h, w)
    mask[y0:y1, x0:x1] = 1.0
    return mask.flatten()


def _mask_file(spec: EditSpec, grid: tuple[int, int]) -> torch.Tensor:
    path = Path(spec.options["mask"])
    if path.suffix == ".npy":
        if not path.is_file():
            raise DataError(f"{spec.text}: no mask file at {path}.")
        mask = torch.from_numpy(np.asarray(np.load(path, allow_pickle=False), dtype=np.float32))
    else:
        mask = _vector_file(path, None)
    if mask.numel() != grid[0] * grid[1] or (mask.ndim == 2 and tuple(mask.shape) != grid):
        raise SpecError(
            f"{spec.text}: the mask has shape {list(mask.shape)}, but the layer's grid is "
            f"{grid[0]}x{grid[1]}; give one weight per grid cell."
        )
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise SpecError(f"{spec.text}: mask weights must lie in [0, 1].")
    return mask.flatten()


def uses_alpha(edits: Sequence[Edit]) -> bool:
    return any(e.uses_alpha for e in edits)
