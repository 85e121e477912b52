"""`diffdissect bench probe`: the whole layer x timestep probe sweep, batched vs scikit-learn, side by side.

One capture of held-out shapes-world images feeds both. The figures: denoiser rows per (image, t)
during the capture (target exactly 1: every layer in the same pass), wall time of fitting every
cell x label with the batched L-BFGS and with a loop of scikit-learn LogisticRegression fits under
the same protocol (standardise on train, choose L2 on validation cross-entropy, score on test), and
their per-cell accuracy difference (target within 1 point).
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffdissect.probe.labels import encode_labels
from diffdissect.probe.linear import DEFAULT_L2_GRID, fit_probe_tasks, fit_sklearn_probe
from diffdissect.probe.splits import split_images
from diffdissect.store import open_store
from diffdissect.world.generator import FACTORS
from diffdissect.world.shapes import ShapesWorld

BENCH_LAYERS = ["down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
BENCH_TIMESTEPS = [25, 200, 500, 800]


def count_denoiser_rows(target_module: torch.nn.Module) -> tuple[list[int], Any]:
    """A forward pre-hook that records the batch size of every denoiser call."""
    rows: list[int] = []
    handle = target_module.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(int((args[0] if args else kwargs["sample"]).shape[0])), with_kwargs=True
    )
    return rows, handle


def run_probe_benchmark(images: int = 1024, store: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        forwards = None
        if store is None:
            store = str(Path(tmp) / "store")
            forwards = _capture_counting(store, images)
        reader = open_store(store)
        rows = reader.rows()
        split = split_images(reader.column("input_id"))
        parts = {name: np.nonzero(split.mask(name))[0] for name in ("train", "val", "test")}
        labels = [f for f in FACTORS if f in rows[0]] or ["label"]
        encoded = {name: encode_labels(rows, name) for name in labels}
        cells = [(l, t) for l in reader.layers for t in reader.timesteps]
        features = {c: reader.load(*c, format="torch", dtype="float32") for c in cells}
        features = {c: (x.flatten(2).mean(-1) if x.dim() > 2 else x) for c, x in features.items()}

        start = time.perf_counter()
        ours = _batched(features, encoded, parts)
        batched_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = {
            (c, name): fit_sklearn_probe(
                *(features[c][parts[p]].numpy() for p in ("train",)),
                enc.y[parts["train"]],
                features[c][parts["val"]].numpy(),
                enc.y[parts["val"]],
                features[c][parts["test"]].numpy(),
            )
            for c in cells
            for name, enc in encoded.items()
        }
        sklearn_s = time.perf_counter() - start

    diffs, same_l2, diffs_same_l2 = [], 0, []
    for (cell, name), ref in theirs.items():
        y_test = encoded[name].y[parts["test"]]
        ours_acc = float((ours[(cell, name)]["pred"] == y_test).mean())
        ref_acc = float((ref["test_pred"] == y_test).mean())
        diffs.append(abs(ours_acc - ref_acc))
        if ours[(cell, name)]["chosen"] == ref["chosen"]:
            same_l2 += 1
            diffs_same_l2.append(diffs[-1])
    fits = len(theirs)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "images": reader.num_rows,
        "cells": len(cells),
        "labels": labels,
        "probes": fits,
        "l2_grid": list(DEFAULT_L2_GRID),
        "denoiser_rows_per_image_timestep": forwards,
        "batched_s": round(batched_s, 2),
        "sklearn_s": round(sklearn_s, 2),
        "speedup": round(sklearn_s / batched_s, 2),
        "max_accuracy_diff": round(max(diffs), 4),
        "mean_accuracy_diff": round(float(np.mean(diffs)), 4),
        "same_l2_fraction": round(same_l2 / fits, 3),
        "max_accuracy_diff_where_same_l2": round(max(diffs_same_l2, default=0.0), 4),
        "cells_within_1_point": round(float(np.mean(np.array(diffs) <= 0.01 + 1e-9)), 3),
    }
    result["pass"] = {
        "one_pass": forwards is None or forwards == 1.0,
        "faster": result["speedup"] > 1.0,
        "within_1_point": result["max_accuracy_diff"] <= 0.01,
    }
    print(f"probe sweep: {len(cells)} cells x {len(labels)} labels = {fits} probes on {reader.num_rows} images")
    if forwards is not None:
        print(f"  capture: {forwards:.3f} denoiser rows per (image, t) for all {len(reader.layers)} layers (target 1)")
    print(
        f"  batched {batched_s:.1f} s vs scikit-learn {sklearn_s:.1f} s -> {result['speedup']:.2f}x; per-cell accuracy "
        f"difference max {result['max_accuracy_diff']:.4f}, mean {result['mean_accuracy_diff']:.4f}; "
        f"same L2 chosen in {result['same_l2_fraction']:.0%} (max difference there "
        f"{result['max_accuracy_diff_where_same_l2']:.4f}); {result['cells_within_1_point']:.0%} of cells within 1 point"
    )
    return result


def _capture_counting(store: str, images: int) -> float:
    world = ShapesWorld.load()
    target = world.target()
    rows, handle = count_denoiser_rows(target.denoiser)
    try:
        world.capture(store, images, BENCH_LAYERS, BENCH_TIMESTEPS, pooling="mean", target=target)
    finally:
        handle.remove()
    # the capture's single-sample shape probe runs on the meta device, or else as one extra 1-row call
    real = sum(rows) - (1 if rows and rows[0] == 1 else 0)
    return real / (images * len(BENCH_TIMESTEPS))


def _batched(features, encoded, parts) -> dict:
    """Every cell x label x L2 strength of one feature width in one batched fit (as `diffdissect probe` does)."""
    out = {}
    by_width: dict[int, list] = {}
    for cell, x in features.items():
        by_width.setdefault(x.shape[1], []).append(cell)
    names = list(encoded)
    for cells in by_width.values():
        x = torch.stack([features[c] for c in cells])
        labels = {p: torch.from_numpy(np.stack([encoded[n].y[parts[p]] for n in names])) for p in ("train", "val")}
        fit = fit_probe_tasks(
            x[:, parts["train"]],
            labels["train"],
            x[:, parts["val"]],
            labels["val"],
            x[:, parts["test"]],
            [len(encoded[n].classes) for n in names],
        )
        for k, cell in enumerate(cells):
            for t, name in enumerate(names):
                out[(cell, name)] = {"pred": fit.test_pred[k, t], "chosen": int(fit.chosen[k, t])}
    return out


def run_revelio_scale_benchmark(
    *,
    d: int = 1280,
    images: int = 5000,
    cells: int = 8,
    classes: int = 10,
    threads: int = 1,
    solver: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Revelio's scale on synthetic features: `cells` cells of `images` x `d` with a class signal of rising
    strength in a 32-dimensional subspace, one label of `classes` classes; ours vs a scikit-learn loop
    under the same protocol, both with `threads` threads (torch and BLAS)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, images)
    basis = rng.normal(size=(32, d)) / np.sqrt(32)
    means = rng.normal(size=(classes, 32))
    features = np.stack(
        [
            (rng.normal(size=(images, d)) + 0.004 * (c + 1) * means[y] @ basis * np.sqrt(d / 32)).astype(np.float32)
            for c in range(cells)
        ]
    )
    order = rng.permutation(images)
    n_train, n_val = int(0.6 * images), int(0.2 * images)
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    x = torch.from_numpy(features)
    yt = {p: torch.from_numpy(y[idx])[None] for p, idx in parts.items()}
    with threadpool_limits(threads):
        start = time.perf_counter()
        fit = fit_probe_tasks(
            x[:, parts["train"]],
            yt["train"],
            x[:, parts["val"]],
            yt["val"],
            x[:, parts["test"]],
            [classes],
            solver=solver,
        )
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        refs = [
            fit_sklearn_probe(
                features[c][parts["train"]],
                y[parts["train"]],
                features[c][parts["val"]],
                y[parts["val"]],
                features[c][parts["test"]],
            )
            for c in range(cells)
        ]
        sklearn_s = time.perf_counter() - start
    y_test = y[parts["test"]]
    ours_acc = [(fit.test_pred[c, 0] == y_test).mean() for c in range(cells)]
    ref_acc = [(r["test_pred"] == y_test).mean() for r in refs]
    diffs = np.abs(np.array(ours_acc) - np.array(ref_acc))
    result = {
        "date": datetime.date.today().isoformat(),
        "threads": threads,
        "solver": fit.solver,
        "config": {"d": d, "images": images, "cells": cells, "classes": classes},
        "ours_s": round(ours_s, 2),
        "sklearn_s": round(sklearn_s, 2),
        "speedup": round(sklearn_s / ours_s, 2),
        "accuracy_ours": [round(float(a), 4) for a in ours_acc],
        "accuracy_sklearn": [round(float(a), 4) for a in ref_acc],
        "max_accuracy_diff": round(float(diffs.max()), 4),
        "load_1min": round(os.getloadavg()[0], 2),
    }
    result["pass"] = {"faster": result["speedup"] >= 1.0, "within_1_point": result["max_accuracy_diff"] <= 0.01}
    print(
        f"Revelio scale ({cells} cells x {images} images x d {d}, {classes} classes, {threads} thread(s)): "
        f"{fit.solver} {ours_s:.1f} s vs scikit-learn {sklearn_s:.1f} s -> {result['speedup']:.2f}x; "
        f"max accuracy difference {result['max_accuracy_diff']:.4f}"
    )
    return result
