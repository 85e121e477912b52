"""`diffdissect demo`: the main job on the embedded default, with no arguments and no network.

Until the shapes world (issue 3) ships trained weights, the embedded default is a tiny
*randomly initialised* Stable-Diffusion-format pipeline, and the demo says so. It writes a small
image folder with a labels CSV, captures three layers x three timesteps x two noise seeds through
the same path a user's `diffdissect capture` takes, verifies the store and writes results.json.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffdissect.capture import CaptureSpec, capture
from diffdissect.data import FolderSource
from diffdissect.models import load_target
from diffdissect.store import open_store, verify_store

NOTICE = ("NOTE: the shapes world is not built yet, so this demo captures from a tiny RANDOMLY "
          "INITIALISED Stable-Diffusion-format pipeline: its activations carry no learned semantics.")
DEMO_LAYERS = ["down_blocks.0", "mid_block", "up_blocks.1"]
DEMO_TIMESTEPS = [50, 250, 500]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def make_demo_images(folder: Path, count: int = 32, size: int = 32, seed: int = 0) -> Path:
    """Circles and squares in four colours on grey, with a labels CSV (file, label, caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(count):
        shape, colour = ("circle", "square")[i % 2], list(COLOURS)[(i // 2) % len(COLOURS)]
        cx, cy, r = rng.uniform(10, size - 10, 2).tolist() + [rng.uniform(5, 8)]
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) if shape == "circle" else \
            (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
        image = np.full((size, size, 3), 128, np.uint8)
        image[mask] = COLOURS[colour]
        name = f"{i:03d}.png"
        Image.fromarray(image).save(folder / name)
        rows.append({"file": name, "label": shape, "caption": f"a {colour} {shape}"})
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "label", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


def run_demo(out: Path, *, progress: bool = True) -> dict[str, Any]:
    from diffdissect.toy.tiny import tiny_sd_pipeline

    print(NOTICE)
    out.mkdir(parents=True, exist_ok=True)
    labels = make_demo_images(out / "images")
    target = load_target(tiny_sd_pipeline(seed=0))
    target.source = "diffdissect.toy.tiny:tiny_sd_pipeline (random init, seed 0)"
    spec = CaptureSpec(layers=DEMO_LAYERS, timesteps=DEMO_TIMESTEPS, seeds=[0, 1], batch_size=16)
    capture(target, FolderSource(out / "images", labels), spec, out / "store", progress=progress)
    report = verify_store(out / "store")
    reader = open_store(out / "store")
    slices = []
    for layer in reader.layers:
        for entry in reader.manifest.timesteps:
            x = reader.load(layer, entry["t"], dtype="float32")
            slices.append({"layer": layer, "t": entry["t"], "alpha_bar": entry["alpha_bar"],
                           "shape": list(x.shape), "mean_l2_norm": float(np.linalg.norm(x, axis=1).mean())})
    results = {"notice": NOTICE, "model": reader.manifest.model, "rows": reader.num_rows,
               "store": str(out / "store"), "verified": report.ok, "slices": slices}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"captured {reader.num_rows} rows (32 images x 2 seeds) x {len(DEMO_LAYERS)} layers x "
          f"{len(DEMO_TIMESTEPS)} timesteps; store verified: {'OK' if report.ok else 'FAILED'}")
    for s in slices:
        print(f"  {s['layer']:<14} t={s['t']:<4} alpha_bar={s['alpha_bar']:.3f}  mean |h| = {s['mean_l2_norm']:.3f}")
    print(f"store: {out / 'store'}   results: {out / 'results.json'}")
    print(f"next: diffdissect store info {out / 'store'}")
    return results
