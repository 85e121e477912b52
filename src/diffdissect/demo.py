"""`diffdissect demo`: the main job on the embedded default (the shapes world), no arguments, no network.

It loads the committed toy pipeline, captures a few layers x timesteps over held-out world images
through the same path `diffdissect capture` takes, and writes `report.html` and `results.json`
with a section for each analysis that exists.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffdissect.capture import CaptureSpec, capture
from diffdissect.data import ArraySource
from diffdissect.models import load_target
from diffdissect.report import Report, heatmap, image_grid
from diffdissect.store import open_store, verify_store
from diffdissect.toy.build import check_weights, load_world, pipeline_dir
from diffdissect.toy.world import FACTORS, WorldConfig, full_caption, sample_world

DEMO_LAYERS = ["down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
DEMO_TIMESTEPS = [100, 400, 700]
DEMO_IMAGES = 256
HELD_OUT_SEED = 123_456_789          # no build step draws from this seed
DEMO_PROMPTS = ["a red circle", "a large blue square at the top left", "a small yellow triangle at the bottom right",
                "a green cross", "a square", "a triangle", "a circle", "a cross"]


def run_demo(out: Path, *, weights: Path | None = None, progress: bool = True) -> dict[str, Any]:
    start = time.perf_counter()
    weights = check_weights(weights)
    world = load_world(weights)
    out.mkdir(parents=True, exist_ok=True)
    target = load_target(str(pipeline_dir(weights)))
    print(f"shapes world: pipeline {pipeline_dir(weights)} ({sum(p.numel() for p in target.denoiser.parameters()):,} UNet parameters)")

    batch = sample_world(DEMO_IMAGES, seed=HELD_OUT_SEED, config=world)
    attributes = {f: batch.labels(f) for f in FACTORS}
    source = ArraySource(batch.images, labels=attributes["shape"], captions=batch.captions, attributes=attributes)
    spec = CaptureSpec(layers=DEMO_LAYERS, timesteps=DEMO_TIMESTEPS, seeds=[0], batch_size=64)
    if (out / "store" / "manifest.json").is_file():
        shutil.rmtree(out / "store")        # the demo's own store from an earlier run (maybe other weights)
    capture(target, source, spec, out / "store", progress=progress)
    verified = verify_store(out / "store").ok
    reader = open_store(out / "store")

    samples = _generate(target.pipeline, DEMO_PROMPTS, per_prompt=8)
    results: dict[str, Any] = {
        "world": {"config": world.to_json(), "planted_colour_given_shape": world.planted_rates()},
        "pipeline": {"path": str(pipeline_dir(weights)), "build": json.loads((weights / "build.json").read_text()),
                     "eval": _load_json(weights / "eval.json")},
        "capture": {"store": str(out / "store"), "rows": reader.num_rows, "verified": verified,
                    "layers": reader.manifest.layers, "timesteps": reader.manifest.timesteps,
                    "slices": _slice_statistics(reader)},
        "samples": {"prompts": DEMO_PROMPTS, "per_prompt": 8},
    }
    report = Report("diffdissect demo: the shapes world")
    _world_section(report, world, batch)
    _pipeline_section(report, results["pipeline"], samples)
    _capture_section(report, results["capture"])
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable))
    path = report.write(out / "report.html")
    print(f"captured {reader.num_rows} held-out images x {len(DEMO_LAYERS)} layers x {len(DEMO_TIMESTEPS)} timesteps; "
          f"store verified: {'OK' if verified else 'FAILED'}")
    print(f"report: {path}\nresults: {out / 'results.json'}\n({time.perf_counter() - start:.0f} s)")
    return results


def _generate(pipe: Any, prompts: list[str], per_prompt: int) -> np.ndarray:
    import torch

    pipe.set_progress_bar_config(disable=True)
    every = [p for p in prompts for _ in range(per_prompt)]
    gens = [torch.Generator().manual_seed(i) for i in range(len(every))]
    images = pipe(prompt=every, num_inference_steps=20, guidance_scale=4.0, generator=gens, output_type="np").images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _slice_statistics(reader) -> list[dict[str, Any]]:
    """Per (layer, t): mean activation norm, and for shape and colour the held-out accuracy of a
    nearest-centroid read-out on standardised features (fit on even rows, scored on odd; chance 1/4).
    A first look only: probes with controls and confidence intervals are their own analysis."""
    out = []
    factors = {f: np.array(reader.column(f)) for f in ("shape", "colour")}
    train = np.arange(reader.num_rows) % 2 == 0
    for layer in reader.layers:
        for entry in reader.manifest.timesteps:
            x = reader.load(layer, entry["t"], dtype="float32")
            z = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
            row = {"layer": layer, "t": entry["t"], "alpha_bar": entry["alpha_bar"],
                   "mean_norm": float(np.linalg.norm(x, axis=1).mean())}
            for name, labels in factors.items():
                classes = np.unique(labels)
                centroids = np.stack([z[train & (labels == c)].mean(0) for c in classes])
                guess = classes[((z[~train, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)]
                row[f"{name}_centroid_accuracy"] = float((guess == labels[~train]).mean())
            out.append(row)
    return out


def _world_section(report: Report, world: WorldConfig, batch) -> None:
    s = report.section("The shapes world")
    s.paragraph("Procedural 32x32 images of one shape, with known factors (shape, colour, size, horizontal and "
                "vertical position) and planted colour defaults per shape. Captions leave factors out at random; "
                "captions without a colour still follow the skewed P(colour | shape).")
    s.image(image_grid(batch.images[:32], columns=8, scale=3), "held-out world images (the demo's capture inputs)")
    s.table(["#", "caption"], [[i, c] for i, c in enumerate(batch.captions[:8])], "their captions (first 8)")
    colours = list(world.colours)
    s.table(["shape", "planted bias", *colours],
            [[shape, world.bias_strength.get(shape, ""), *[world.colour_given_shape[shape][c] for c in colours]]
             for shape in world.shapes], "planted P(colour | shape)")


def _pipeline_section(report: Report, info: dict[str, Any], samples: np.ndarray) -> None:
    s = report.section("The toy text-to-image pipeline")
    s.paragraph("A miniature Stable Diffusion in stock diffusers format (AutoencoderKL, UNet2DConditionModel with "
                "cross-attention, CLIP text encoder and tokenizer), trained on the world by `diffdissect toy build`.")
    s.image(image_grid(samples, columns=8, scale=3), "8 samples per prompt (20 steps, guidance 4), one row per prompt: "
            + "; ".join(DEMO_PROMPTS))
    build = info["build"]
    s.table(["part", "training time (s)"], sorted(build.get("timings_s", {}).items()), "build timings")
    evaluation = info.get("eval")
    if evaluation:
        rows = [[f, v["rate"], f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"]
                for f, v in evaluation["full_prompts"]["per_factor"].items()]
        s.table(["factor", "match rate", "95% CI"], rows, "prompts naming every factor: the captioner's reading matches")
        rows = [[shape, v["bias"], v["max_abs_error"], v["shape_match"]]
                for shape, v in evaluation["colour_defaults"]["per_shape"].items()]
        s.table(["shape", "planted bias", "max |generated - planted| colour rate", "shape match"], rows,
                "prompts that omit the colour: learned defaults vs planted")
    else:
        s.note("No eval.json beside the weights: run `diffdissect toy eval --save` for the quality figures.")


def _capture_section(report: Report, info: dict[str, Any]) -> None:
    s = report.section("Capture: layers x timesteps")
    s.paragraph(f"{info['rows']} held-out images captured in one forward pass per (image, t), mean-pooled, into "
                f"{info['store']} (verified: {info['verified']}). t is the training-schedule index (larger = noisier).")
    s.table(["t", "alpha_bar", "noise std"], [[e["t"], e["alpha_bar"], e["noise_std"]] for e in info["timesteps"]])
    layers = list(info["layers"])
    ts = [e["t"] for e in info["timesteps"]]
    for factor in ("shape", "colour"):
        grid = np.array([[next(x[f"{factor}_centroid_accuracy"] for x in info["slices"] if x["layer"] == l and x["t"] == t)
                          for t in ts] for l in layers])
        s.image(heatmap(grid, layers, [f"t={t}" for t in ts], f"{factor}: held-out nearest-centroid accuracy",
                        vmin=0, vmax=1), f"How well a nearest-centroid read-out of the pooled features recovers {factor} "
                f"(4 classes, chance 0.25). A first look: the probe analysis adds controls and confidence intervals.")


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
