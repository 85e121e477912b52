"""`diffdissect toy eval`: does the toy pipeline do what the world says? Judged by the attribute captioner.

Checks (each over at least 200 generated samples):
  * prompts naming every factor: the captioner's reading of each factor matches the prompt (>= 90%);
  * prompts that omit the colour: per shape, generated colour rates vs the planted P(colour | shape)
    (within 10 points);
  * the captioner's own accuracy on held-out world images (>= 98% per factor).
Every rate carries a 95% Wilson interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffdissect.data.transforms import unit_to_uint8
from diffdissect.stats import wilson
from diffdissect.world.classifiers import factor_accuracy, images_to_tensor
from diffdissect.world.generator import FACTORS, WorldConfig, captions_for, sample_factors
from diffdissect.world.shapes import ShapesWorld

GENERATED_END = "<!-- end of the figures written by `diffdissect toy eval --doc`; what follows is kept -->"
TARGETS = {"full_prompt_match": 0.90, "colour_rate_max_error": 0.10, "captioner_accuracy": 0.98}


@dataclass
class EvalConfig:
    samples: int = 256
    """samples per check (full prompts; colour-omitted prompts per shape); >= 200 for the targets"""
    steps: int = 20
    """sampler steps"""
    guidance_full: float = 4.0
    """guidance for prompts naming every factor"""
    guidance_rates: float = 1.0
    """guidance for the default rates (1: none; guidance sharpens towards the mode)"""
    batch: int = 128
    """images generated per pipeline call"""
    seed: int = 0
    """sample i uses generator seed `seed + i`"""


@torch.no_grad()
def generate(pipe: Any, prompts: list[str], *, steps: int, guidance: float, seed: int, batch: int) -> np.ndarray:
    """(N, H, W, 3) uint8 images; sample i uses generator seed `seed + i` (batch-independent)."""
    out = []
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(part))]
        images = pipe(
            prompt=part, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np"
        ).images
        out.append(unit_to_uint8(images))
    return np.concatenate(out)


def evaluate_toy(
    shapes_world: ShapesWorld | None = None, config: EvalConfig | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """The checks above on a shapes world (default: the committed one)."""
    config = config or EvalConfig()
    shapes_world = shapes_world or ShapesWorld.load()
    world = shapes_world.config
    pipe = shapes_world.pipeline()
    pipe.set_progress_bar_config(disable=True)
    captioner = shapes_world.classifier("captioner")
    results: dict[str, Any] = {"config": asdict(config), "targets": TARGETS}

    accuracy = factor_accuracy(captioner, world, n=max(2000, config.samples))
    results["captioner_accuracy"] = {
        f: {"rate": a, "pass": a >= TARGETS["captioner_accuracy"]} for f, a in accuracy.items()
    }

    results["full_prompts"] = _full_prompt_check(pipe, captioner, world, config)
    results["colour_defaults"] = _colour_default_check(pipe, captioner, world, config)
    results["pass"] = (
        all(v["pass"] for v in results["captioner_accuracy"].values())
        and all(v["pass"] for v in results["full_prompts"]["per_factor"].values())
        and all(v["pass"] for v in results["colour_defaults"]["per_shape"].values())
    )
    return results


def _full_prompt_check(pipe, captioner, world: WorldConfig, config: EvalConfig) -> dict[str, Any]:
    rng = np.random.default_rng(60_000_000 + config.seed)
    n = config.samples
    factors = {f: rng.integers(0, len(world.values(f)), n) for f in FACTORS}  # every combination equally
    everything = {k: np.ones(n, bool) for k in world.keep}
    prompts = captions_for(world, factors, everything)
    images = generate(
        pipe, prompts, steps=config.steps, guidance=config.guidance_full, seed=config.seed * 7919, batch=config.batch
    )
    pred = captioner.predict(images_to_tensor(images))
    per_factor = {}
    for f in FACTORS:
        hits = int((pred[f] == factors[f]).sum())
        rate = hits / n
        per_factor[f] = {"rate": rate, "ci95": wilson(hits, n), "pass": rate >= TARGETS["full_prompt_match"]}
    all_hits = int(np.all([pred[f] == factors[f] for f in FACTORS], axis=0).sum())
    return {
        "samples": n,
        "guidance": config.guidance_full,
        "per_factor": per_factor,
        "all_factors_rate": all_hits / n,
        "examples": prompts[:8],
        "images": images[:32],
    }


def _colour_default_check(pipe, captioner, world: WorldConfig, config: EvalConfig) -> dict[str, Any]:
    rng = np.random.default_rng(70_000_000 + config.seed)
    colours = list(world.colours)
    per_shape, grids = {}, {}
    for s, shape in enumerate(world.shapes):
        n = config.samples
        factors = sample_factors(n, rng, world)
        factors["shape"] = np.full(n, s)
        kept = {k: rng.random(n) < p for k, p in world.keep.items()}
        kept["colour"], kept["shape"] = np.zeros(n, bool), np.ones(n, bool)
        prompts = captions_for(world, factors, kept)
        images = generate(
            pipe,
            prompts,
            steps=config.steps,
            guidance=config.guidance_rates,
            seed=config.seed * 7919 + 100_000 * (s + 1),
            batch=config.batch,
        )
        pred = captioner.predict(images_to_tensor(images))
        counts = np.bincount(pred["colour"], minlength=len(colours))
        rates = {
            c: {
                "generated": counts[i] / n,
                "ci95": wilson(int(counts[i]), n),
                "planted": world.colour_given_shape[shape][c],
            }
            for i, c in enumerate(colours)
        }
        error = max(abs(v["generated"] - v["planted"]) for v in rates.values())
        per_shape[shape] = {
            "samples": n,
            "bias": world.bias_strength.get(shape, ""),
            "rates": rates,
            "max_abs_error": error,
            "shape_match": float((pred["shape"] == s).mean()),
            "pass": error <= TARGETS["colour_rate_max_error"],
        }
        grids[shape] = images[:16]
    return {"guidance": config.guidance_rates, "per_shape": per_shape, "images": grids}


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The results without image arrays: plain JSON."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "images"}
        if isinstance(value, (list, tuple)):
            return [strip(v) for v in value]
        if isinstance(value, np.generic):  # numpy scalars (float64, bool_, int64) -> Python
            return value.item()
        return value

    return strip(results)


def write_toy_world_doc(results: dict[str, Any], path: str | Path, command: str, machine: str, date: str) -> None:
    """docs/toy-world.md: the figures with the command, date and machine that produced them."""
    lines = [
        "# The shapes world: quality figures",
        "",
        f"Measured by `{command}` on {date}, {machine}. Targets from the issue in brackets.",
        "",
        f"## Captioner accuracy on held-out world images [>= {TARGETS['captioner_accuracy']:.0%} per factor]",
        "",
        "| factor | accuracy | pass |",
        "|---|---|---|",
    ]
    for f, v in results["captioner_accuracy"].items():
        lines.append(f"| {f} | {v['rate']:.3f} | {'yes' if v['pass'] else 'NO'} |")
    full = results["full_prompts"]
    lines += [
        "",
        f"## Prompts naming every factor [>= {TARGETS['full_prompt_match']:.0%} match per factor]",
        "",
        f"{full['samples']} samples, guidance {full['guidance']}, {results['config']['steps']} steps; "
        f"all five factors right at once: {full['all_factors_rate']:.3f}.",
        "",
        "| factor | match rate | 95% CI | pass |",
        "|---|---|---|---|",
    ]
    for f, v in full["per_factor"].items():
        lines.append(
            f"| {f} | {v['rate']:.3f} | [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | {'yes' if v['pass'] else 'NO'} |"
        )
    col = results["colour_defaults"]
    lines += [
        "",
        f"## Prompts that omit the colour [generated rates within {TARGETS['colour_rate_max_error'] * 100:.0f} points "
        "of the planted P(colour | shape)]",
        "",
        f"Guidance {col['guidance']} (none: guidance sharpens towards the mode).",
        "",
        "| shape | planted bias | colour | planted | generated | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for shape, v in col["per_shape"].items():
        for c, r in v["rates"].items():
            lines.append(
                f"| {shape} | {v['bias']} | {c} | {r['planted']:.2f} | {r['generated']:.3f} | "
                f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] |"
            )
        lines.append(
            f"| {shape} | | **max error** | | **{v['max_abs_error']:.3f}** ({'pass' if v['pass'] else 'FAIL'}) | |"
        )
    lines += [
        "",
        f"Overall: {'all targets met' if results['pass'] else 'NOT all targets met (see the rows marked NO/FAIL)'}.",
        "",
        GENERATED_END,
    ]
    path = Path(path)
    kept = path.read_text().split(GENERATED_END, 1)[1] if path.is_file() and GENERATED_END in path.read_text() else "\n"
    path.write_text("\n".join(lines) + kept)
