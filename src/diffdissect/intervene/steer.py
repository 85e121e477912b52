"""`diffdissect steer`: prompts x seeds x alphas x edits sampled with the pipeline's own sampler, judged.

Layout of an output directory:
  images/base/p<i>-s<seed>.png              the unedited samples
  images/e<k>/a<alpha>/p<i>-s<seed>.png     edit k at alpha (edits without alpha: a-)
  grids/e<k>.png                            rows: unedited, then each alpha; columns: (prompt, seed)
  readings.json                             the judge's caption and attribute values per image
  effects.json / effects.csv                per edit and alpha: target rate, keep rates, pixel distance (CIs)
  steer.json                                config, calibration norms, schedule, cost, effects
  report.html                               the report section

One pipeline call per (prompt, edit, alpha) samples every seed of the prompt as one batch (generators
seeded per sample), and the unedited samples are batched the same way, so an edit that changes nothing
reproduces the unedited image bit for bit. Alpha is in units of each edited layer's typical per-location
norm, measured on the unedited samples themselves (the calibration costs no extra pass).
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from diffdissect.atomic import atomic_write_bytes, atomic_write_json
from diffdissect.capture.spec import TrajectoryConfig
from diffdissect.capture.trajectory import _condition
from diffdissect.data.transforms import unit_to_uint8
from diffdissect.errors import SpecError
from diffdissect.intervene.apply import (
    BRANCHES,
    Intervention,
    layer_shapes,
    sampling_schedule,
)
from diffdissect.intervene.edits import Edit
from diffdissect.intervene.sources import bind_edit, check_coverage, edit_directions, parse_edits
from diffdissect.models.target import Target
from diffdissect.stats import bootstrap_mean_ci, wilson


@dataclass
class SteerConfig:
    """What `diffdissect steer` samples and how it judges the result."""

    prompts: list[str] = field(default_factory=list)
    """prompts to sample (DiT pipelines: class ids or names)"""
    edits: list[str] = field(default_factory=list)
    """edits, one grid each: KIND@LAYER=SOURCE[;option...]; join edits with '|' to compose them"""
    expect: list[str] = field(default_factory=list)
    """per edit, the attribute value it should produce (ATTRIBUTE=VALUE, e.g. colour=red), '-' for none"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """sampling seeds per prompt"""
    alphas: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    """edit strengths, in units of the layer's typical per-location norm"""
    steps: int = TrajectoryConfig.steps
    """sampler steps (the same default as capture and directions runs)"""
    guidance: float = 7.5
    """classifier-free guidance scale"""
    branch: Literal["both", "cond", "uncond"] = "both"
    """under guidance, the half of the denoiser batch edited: both, cond or uncond"""
    batch_size: int = 16
    """samples per pipeline call"""
    attributes: dict[str, list[str]] = field(default_factory=dict)
    """attribute -> values the judge's captions are read for (the shapes world: its factors)"""
    save_images: bool = True
    """write every sample as a PNG"""

    def validate(self) -> None:
        if not self.prompts:
            raise SpecError("steer needs at least one prompt.")
        if not self.edits:
            raise SpecError("steer needs at least one edit (KIND@LAYER=SOURCE).")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SpecError(f"seeds must be distinct and at least one: {self.seeds}.")
        if not self.alphas:
            raise SpecError("steer needs at least one alpha.")
        if self.steps < 1 or self.batch_size < 1:
            raise SpecError("steps and batch_size must be positive.")
        if self.branch not in BRANCHES:
            raise SpecError(f"branch must be one of {BRANCHES}, not {self.branch!r}.")
        if self.expect and len(self.expect) != len(self.edits):
            raise SpecError(
                f"give one expect per edit ({len(self.edits)} edits, {len(self.expect)} expects); "
                "use '-' for an edit without a target."
            )
        for e in self.expect:
            if e != "-":
                attribute, eq, value = e.partition("=")
                if not eq or attribute not in self.attributes or value not in self.attributes[attribute]:
                    raise SpecError(
                        f"expect {e!r} must be ATTRIBUTE=VALUE with a judged attribute and value; "
                        f"attributes: {self.attributes or 'none (no judge)'}."
                    )


# ---- the judge ----------------------------------------------------------------------------------------------
class Captioner(Protocol):
    name: str

    def caption(self, images: np.ndarray) -> list[str]: ...


@dataclass(frozen=True)
class Reading:
    caption: str | None
    values: dict[str, str | None]


class Judge:
    """A captioner whose captions are read for attribute values: exactly one value named -> that value,
    none or several -> None (unreadable)."""

    def __init__(self, captioner: Captioner, attributes: dict[str, list[str]]):
        self.captioner, self.attributes = captioner, attributes
        self.name = captioner.name

    def read(self, images: np.ndarray) -> list[Reading]:
        from diffdissect.directions.captioners import caption_images

        result = caption_images(self.captioner, images)
        return [Reading(c, read_attributes(c, self.attributes)) for c in result.captions]


def read_attributes(caption: str | None, attributes: dict[str, list[str]]) -> dict[str, str | None]:
    text = " " + " ".join(re.findall(r"[a-z0-9]+", (caption or "").lower())) + " "
    out: dict[str, str | None] = {}
    for attribute, values in attributes.items():
        named = [v for v in values if f" {v.lower()} " in text]
        out[attribute] = named[0] if len(named) == 1 else None
    return out


# ---- results --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Effect:
    """One edit at one alpha, over every (prompt, seed)."""

    edit: str
    alpha: float | None
    n: int
    target: str | None
    target_rate: float | None
    target_ci: tuple[float, float] | None
    baseline_target_rate: float | None
    keep: dict[str, dict[str, Any]]  # attribute -> {"rate", "ci", "n"} (unreadable pairs excluded)
    pixel_distance: float
    pixel_distance_ci: tuple[float, float]
    identical: int  # samples equal to the unedited sample bit for bit

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SteerResult:
    config: dict[str, Any]
    edits: list[str]
    calibration: dict[str, float]
    schedule: list[int]
    judge: str | None
    effects: list[Effect]
    cost: dict[str, Any]
    out: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "effects": [e.to_json() for e in self.effects]}

    def effect(self, edit: int, alpha: float | None) -> Effect:
        name = self.edits[edit]
        return next(e for e in self.effects if e.edit == name and e.alpha == alpha)


# ---- the run ---------------------------------------------------------------------------------------------------
def prepare_edits(
    target: Target, config: SteerConfig
) -> tuple[list[list[Edit]], list[int] | None, dict[str, tuple[int, ...]]]:
    """Parse and bind every edit (all checks before any sampling). Returns (edits, schedule, layer shapes)."""
    specs = [parse_edits(text) for text in config.edits]
    layers = list(dict.fromkeys(s.layer for group in specs for s in group))
    shapes = layer_shapes(target, layers)
    schedule = sampling_schedule(target, config.steps)

    def identity(known: dict[str, Any] | None = None) -> dict[str, Any]:
        # only when a source records a model; `known` lets the target reuse that digest if its files are unchanged
        return target.identity(known=known)

    bound = [
        [bind_edit(s, shapes[s.layer], schedule, target.num_train_timesteps, identity) for s in group]
        for group in specs
    ]
    return bound, schedule, shapes


def run_steer(
    target: Target, config: SteerConfig, out: str | Path, judge: Judge | None = None, *, progress: bool = True
) -> SteerResult:
    """Sample the unedited and the edited images, judge them, write the effect tables, grids and report."""
    config.validate()
    if config.expect and any(e != "-" for e in config.expect) and judge is None:
        raise SpecError("expect needs a judge (the shapes world's captioner or a transformers image-to-text model).")
    out = Path(out)
    edits, schedule, _ = prepare_edits(target, config)
    conditions = [_condition(target, p) for p in config.prompts]
    if hasattr(target.pipeline, "set_progress_bar_config"):
        target.pipeline.set_progress_bar_config(disable=True)
    layers = list(dict.fromkeys(e.layer for group in edits for e in group))
    started = time.perf_counter()

    with Intervention(target, [], record_norms=layers, branch=config.branch) as probe:
        base = _sample_all(target, probe, conditions, config)
        seen = _distinct(probe.seen_t)
    calibration = probe.calibration()
    if schedule is not None and seen != schedule:
        raise SpecError(f"the sampler visited t {seen}, not the schedule {schedule} the edits were checked against.")
    schedule = seen
    _check_windows(edits, config.edits, schedule)  # flow models: their schedule is known from this pass
    for group, text in zip(edits, config.edits):  # per-t directions, before any edited sampling
        for edit in group:
            window = getattr(edit, "window", None)
            if window is None:
                continue
            for direction in edit_directions(edit):
                check_coverage(text, direction, window, schedule)
    baseline_seconds = time.perf_counter() - started

    images: dict[tuple[int, float | None], np.ndarray] = {}  # uint8: the float samples are compared at once
    compared: dict[tuple[int, float | None], tuple[np.ndarray, int]] = {}
    calls = 0
    for k, group in enumerate(edits):
        alphas: list[float | None] = list(config.alphas) if any(e.uses_alpha for e in group) else [None]
        with Intervention(target, group, scales=calibration, branch=config.branch) as intervention:
            for alpha in alphas:
                intervention.set_alpha(alpha or 0.0)
                edited = _sample_all(target, intervention, conditions, config)
                compared[(k, alpha)] = _compare(base, edited)
                images[(k, alpha)] = _uint8(edited)
                calls += intervention.calls
                intervention.calls = 0
    edited_seconds = time.perf_counter() - started - baseline_seconds

    readings = _judge_all(judge, base, images) if judge is not None else None
    effects = [
        _effect(config.edits[k], alpha, _expect(config, k), *compared[(k, alpha)], readings, k) for (k, alpha) in images
    ]
    n_samples = len(conditions) * len(config.seeds)
    cost = {
        "pipeline_calls_per_prompt_edit_alpha": 1,
        "samples": n_samples,
        "edited_runs": len(images),
        "baseline_seconds": round(baseline_seconds, 3),
        "edited_seconds": round(edited_seconds, 3),
        "seconds_per_run_ratio": round(edited_seconds / max(len(images), 1) / max(baseline_seconds, 1e-9), 3),
    }
    result = SteerResult(
        config=asdict(config),
        edits=list(config.edits),
        calibration=calibration,
        schedule=schedule,
        judge=judge.name if judge else None,
        effects=effects,
        cost=cost,
        out=str(out),
    )
    write_outputs(result, out, base, images, readings, config)
    return result


def _check_windows(edits: list[list[Edit]], texts: list[str], schedule: list[int]) -> None:
    for group, text in zip(edits, texts):
        for edit in group:
            window = getattr(edit, "window", None)
            if window is None:
                continue
            if window.steps is not None and window.steps[1] >= len(schedule):
                raise SpecError(
                    f"{text}: steps {window.steps[0]}:{window.steps[1]} is outside the schedule of "
                    f"{len(schedule)} steps (indices 0..{len(schedule) - 1})."
                )
            if window.t_range is not None and not any(window.t_range[0] <= t <= window.t_range[1] for t in schedule):
                raise SpecError(
                    f"{text}: no sampler step has t in {window.t_range[0]}:{window.t_range[1]}; the "
                    f"schedule's t: {schedule}."
                )


def _distinct(ts: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(ts))


def _expect(config: SteerConfig, k: int) -> str | None:
    return config.expect[k] if config.expect and config.expect[k] != "-" else None


@torch.no_grad()
def _sample_all(target: Target, intervention: Intervention, conditions: list[Any], config: SteerConfig) -> np.ndarray:
    """(prompts, seeds, H, W, 3) float images in [0, 1]; one pipeline call per prompt and seed batch."""
    per_prompt = []
    for condition in conditions:
        parts = []
        for start in range(0, len(config.seeds), config.batch_size):
            seeds = config.seeds[start : start + config.batch_size]
            intervention.reset()
            intervention.samples = len(seeds)
            kwargs: dict[str, Any] = {
                "num_inference_steps": config.steps,
                "guidance_scale": config.guidance,
                "generator": [torch.Generator().manual_seed(s) for s in seeds],
                "output_type": "np",
            }
            kwargs["class_labels" if target.kind == "dit" else "prompt"] = [condition] * len(seeds)
            if target.family is not None:
                kwargs.update(target.family.pipeline_kwargs(target))
            parts.append(np.asarray(target.pipeline(**kwargs).images, dtype=np.float32))
        per_prompt.append(np.concatenate(parts))
    return np.stack(per_prompt)


def _judge_all(judge: Judge, base: np.ndarray, images: dict[tuple[int, float | None], np.ndarray]):
    keys = [("base", None), *images]
    stacked = np.concatenate(
        [_uint8(base).reshape(-1, *base.shape[2:])] + [_uint8(images[k]).reshape(-1, *base.shape[2:]) for k in images]
    )
    readings = judge.read(stacked)
    per = base.shape[0] * base.shape[1]
    return {key: readings[i * per : (i + 1) * per] for i, key in enumerate(keys)}


def _uint8(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    return unit_to_uint8(images)


def _compare(base: np.ndarray, edited: np.ndarray) -> tuple[np.ndarray, int]:
    """Per sample, the RMS pixel distance (pixels in [0, 1]) to the unedited sample of the same prompt and seed,
    and how many samples equal it bit for bit (the pipeline's float output, before any rounding)."""
    n = base.shape[0] * base.shape[1]
    flat_base, flat = base.reshape(n, -1), edited.reshape(n, -1)
    distance = np.sqrt(((flat.astype(np.float64) - flat_base) ** 2).mean(1))
    return distance, int(sum(np.array_equal(a, b) for a, b in zip(flat, flat_base)))


def _effect(
    edit: str,
    alpha: float | None,
    expect: str | None,
    distance: np.ndarray,
    identical: int,
    readings: dict | None,
    k: int,
) -> Effect:
    n = len(distance)
    target_rate = target_ci = baseline_rate = None
    keep: dict[str, dict[str, Any]] = {}
    if readings is not None:
        edited, unedited = readings[(k, alpha)], readings[("base", None)]
        attribute, value = expect.split("=", 1) if expect else (None, None)
        if expect:
            hits = sum(r.values.get(attribute) == value for r in edited)
            target_rate, target_ci = hits / n, wilson(hits, n)
            baseline_rate = sum(r.values.get(attribute) == value for r in unedited) / n
        for name in edited[0].values if edited else []:
            if name == attribute:
                continue
            pairs = [(a.values[name], b.values[name]) for a, b in zip(edited, unedited) if b.values[name] is not None]
            kept = sum(a == b for a, b in pairs)
            keep[name] = {"rate": kept / len(pairs) if pairs else None, "ci": wilson(kept, len(pairs)), "n": len(pairs)}
    return Effect(
        edit=edit,
        alpha=alpha,
        n=n,
        target=expect,
        target_rate=target_rate,
        target_ci=target_ci,
        baseline_target_rate=baseline_rate,
        keep=keep,
        pixel_distance=float(distance.mean()),
        pixel_distance_ci=bootstrap_mean_ci(distance, resamples=1000),
        identical=identical,
    )


# ---- outputs ----------------------------------------------------------------------------------------------------
def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_uint8(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _alpha_name(alpha: float | None) -> str:
    return "a-" if alpha is None else f"a{alpha:g}"


def write_outputs(
    result: SteerResult, out: Path, base: np.ndarray, images: dict, readings: dict | None, config: SteerConfig
) -> None:
    from diffdissect.report.figures import image_grid

    out.mkdir(parents=True, exist_ok=True)
    _remove_earlier_outputs(out)
    n_prompts, n_seeds = base.shape[:2]
    names = [f"p{i}-s{s}" for i in range(n_prompts) for s in config.seeds]
    if config.save_images:
        for folder, imgs in [("base", base), *((f"e{k}/{_alpha_name(a)}", v) for (k, a), v in images.items())]:
            (out / "images" / folder).mkdir(parents=True, exist_ok=True)
            for name, image in zip(names, imgs.reshape(-1, *base.shape[2:])):
                atomic_write_bytes(out / "images" / folder / f"{name}.png", _png(image))
    (out / "grids").mkdir(exist_ok=True)
    grids = {}
    for k in range(len(result.edits)):
        rows = [base] + [v for (kk, _), v in images.items() if kk == k]
        stacked = np.concatenate([r.reshape(-1, *base.shape[2:]) for r in rows])
        grids[k] = image_grid(stacked, columns=n_prompts * n_seeds)
        atomic_write_bytes(out / "grids" / f"e{k}.png", grids[k])
    if readings is not None:
        atomic_write_json(
            out / "readings.json",
            {
                "judge": result.judge,
                "images": [
                    {
                        "image": f"{'base' if key[0] == 'base' else f'e{key[0]}/{_alpha_name(key[1])}'}/{name}",
                        "caption": r.caption,
                        "values": r.values,
                    }
                    for key, rs in readings.items()
                    for name, r in zip(names, rs)
                ],
            },
        )
    atomic_write_json(out / "effects.json", [e.to_json() for e in result.effects])
    atomic_write_bytes(out / "effects.csv", _effects_csv(result.effects))
    atomic_write_json(out / "steer.json", result.to_json())
    from diffdissect.report import Report

    report = Report("diffdissect steer")
    steer_section(report, result, grids)
    report.write(out / "report.html")


def _remove_earlier_outputs(out: Path) -> None:
    """Delete an earlier steer run's own files in `out` (images/base|eK/ALPHA/pN-sS.png, grids/eK.png,
    readings.json), so that a rerun with fewer edits, seeds or alphas leaves no stale outputs. Only files named
    as steer writes them are removed, and folders only once empty; anything else in `out` is kept."""
    image = re.compile(r"p\d+-s-?\d+\.png")
    images = out / "images"
    if images.is_dir():
        for folder in [images / "base", *(p for p in images.glob("e*") if re.fullmatch(r"e\d+", p.name))]:
            if not folder.is_dir():
                continue
            for path in [*folder.glob("*.png"), *folder.glob("*/*.png")]:
                if path.is_file() and image.fullmatch(path.name):
                    path.unlink()
            for sub in sorted((p for p in folder.glob("*") if p.is_dir()), reverse=True):
                if not any(sub.iterdir()):
                    sub.rmdir()
            if not any(folder.iterdir()):
                folder.rmdir()
        if not any(images.iterdir()):
            images.rmdir()
    for grid in (out / "grids").glob("e*.png"):
        if re.fullmatch(r"e\d+\.png", grid.name) and grid.is_file():
            grid.unlink()
    (out / "readings.json").unlink(missing_ok=True)


def _effects_csv(effects: list[Effect]) -> bytes:
    attributes = sorted({a for e in effects for a in e.keep})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "edit",
            "alpha",
            "n",
            "target",
            "target_rate",
            "target_ci_low",
            "target_ci_high",
            "baseline_target_rate",
            *[f"keep_{a}" for a in attributes],
            "pixel_distance",
            "identical",
        ]
    )
    for e in effects:
        ci = e.target_ci or (None, None)
        writer.writerow(
            [
                e.edit,
                e.alpha,
                e.n,
                e.target,
                e.target_rate,
                ci[0],
                ci[1],
                e.baseline_target_rate,
                *[e.keep.get(a, {}).get("rate") for a in attributes],
                e.pixel_distance,
                e.identical,
            ]
        )
    return buffer.getvalue().encode()


def steer_section(report: Any, result: SteerResult, grids: dict[int, bytes] | None = None) -> Any:
    """The report section: per edit, the effect table (rates with 95% Wilson intervals) and its grid."""
    s = report.section("Interventions: steering while sampling")
    s.paragraph(
        f"Each edit is applied by hooks inside the pipeline's own sampler ({result.config['steps']} steps, "
        f"guidance {result.config['guidance']}, branch {result.config['branch']}); alpha is in units of "
        f"the layer's typical per-location norm (calibration: "
        f"{', '.join(f'{k} {v:.3g}' for k, v in result.calibration.items())}). Judge: "
        f"{result.judge or 'none'}. Keep rates compare each attribute with the unedited sample of the same "
        "seed; pixel distance is the RMS difference in [0, 1]; 'identical' counts samples equal to the "
        "unedited one bit for bit."
    )
    attributes = sorted({a for e in result.effects for a in e.keep})
    for k, edit in enumerate(result.edits):
        rows = []
        for e in (e for e in result.effects if e.edit == edit):
            target = (
                "-"
                if e.target_rate is None or e.target_ci is None
                else f"{e.target_rate:.2f} [{e.target_ci[0]:.2f}, {e.target_ci[1]:.2f}] (base "
                f"{e.baseline_target_rate:.2f})"
            )
            keeps = [
                (
                    "-"
                    if e.keep[a]["rate"] is None
                    else f"{e.keep[a]['rate']:.2f} [{e.keep[a]['ci'][0]:.2f}, {e.keep[a]['ci'][1]:.2f}]"
                )
                if a in e.keep
                else "-"
                for a in attributes
            ]
            rows.append(
                [
                    "-" if e.alpha is None else e.alpha,
                    e.n,
                    target,
                    *keeps,
                    f"{e.pixel_distance:.3f} [{e.pixel_distance_ci[0]:.3f}, {e.pixel_distance_ci[1]:.3f}]",
                    e.identical,
                ]
            )
        target_name = next((e.target for e in result.effects if e.edit == edit and e.target), None)
        s.table(
            [
                "alpha",
                "n",
                f"target {target_name or ''}".strip(),
                *[f"keep {a}" for a in attributes],
                "pixel distance",
                "identical",
            ],
            rows,
            caption=edit,
        )
        if grids and k in grids:
            s.image(grids[k], caption=f"{edit}: rows unedited, then each alpha; columns prompt x seed")
    return s


def load_result(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "steer.json").read_text())
