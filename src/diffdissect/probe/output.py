"""Probe results as files (JSON, CSV, heatmap PNGs) and as a report section. Nothing here fits anything."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from diffdissect.atomic import atomic_write_bytes
from diffdissect.paths import safe_name
from diffdissect.probe.results import ControlSummary, ProbeCell, ProbeResults, ProbeSummary
from diffdissect.report import Report, Section, heatmap

WEIGHTS_FILE, WEIGHTS_INDEX = "probe_weights.safetensors", "probe_weights.json"
CSV_COLUMNS = (
    "label",
    "condition",
    "head",
    "layer",
    "t",
    "accuracy",
    "ci_low",
    "ci_high",
    "seed_std",
    "chance_uniform",
    "chance_majority",
    "chance_constant",
    "l2",
    "val_accuracy",
    "train_accuracy",
    "n_train_images",
    "n_val_images",
    "n_test_images",
)


def grid(results: ProbeResults, label: str, condition: str = "trained") -> tuple[np.ndarray, list[str], list[int]]:
    """Accuracy as a (layers x timesteps) array; NaN where a cell was skipped."""
    layers = list(dict.fromkeys(c[0] for c in results.cells))
    timesteps = list(dict.fromkeys(c[1] for c in results.cells))
    values = np.full((len(layers), len(timesteps)), np.nan)
    for r in results.cells_of(label, condition):
        values[layers.index(r.layer), timesteps.index(r.t)] = r.accuracy
    return values, layers, timesteps


def best_cell(results: ProbeResults, label: str, condition: str = "trained") -> ProbeCell | None:
    """The headline cell: the highest *validation* accuracy (ties: the first cell in the sweep's order).

    Its test accuracy is then an honest estimate; picking the cell on test accuracy over L x T cells
    (the winner's curse) would bias the headline upwards."""
    rows = results.cells_of(label, condition)
    return max(rows, key=lambda r: r.val_accuracy) if rows else None


def test_max_cell(results: ProbeResults, label: str, condition: str = "trained") -> ProbeCell | None:
    """The cell with the highest *test* accuracy: a max over cells, biased upwards (shown for comparison only)."""
    rows = results.cells_of(label, condition)
    return max(rows, key=lambda r: r.accuracy) if rows else None


SELECTION = (
    "the cell with the highest validation accuracy; its test accuracy is reported (the test-set "
    "max over cells is shown beside it, biased upwards)"
)


def summary_rows(results: ProbeResults) -> list[ProbeSummary]:
    """Per label: the trained cell chosen on validation, and each control at its own validation-chosen cell."""
    out = []
    for label, info in results.labels.items():
        best = best_cell(results, label)
        top = test_max_cell(results, label)
        if best is None or top is None:
            continue
        controls = {}
        for control in ("shuffled", "random_init"):
            rows = results.cells_of(label, control)
            other = best_cell(results, label, control)
            biased = test_max_cell(results, label, control)
            if other is None or biased is None:
                continue
            same = next((r for r in rows if (r.layer, r.t) == (best.layer, best.t)), None)
            controls[control] = ControlSummary(
                best_accuracy=other.accuracy,
                best_cell=f"{other.layer} @ t={other.t}",
                ci=[other.ci_low, other.ci_high],
                test_max_accuracy=biased.accuracy,
                mean_accuracy=float(np.mean([r.accuracy for r in rows])),
                chance_constant=float(np.mean([r.chance_constant for r in rows])),
                at_best_cell=same.accuracy if same else None,
            )
        out.append(
            ProbeSummary(
                label=label,
                classes=len(info.classes),
                selected_on="validation",
                best_layer=best.layer,
                best_t=best.t,
                best_val_accuracy=best.val_accuracy,
                best_accuracy=best.accuracy,
                ci=[best.ci_low, best.ci_high],
                chance_majority=best.chance_majority,
                test_max_accuracy=top.accuracy,
                test_max_cell=f"{top.layer} @ t={top.t}",
                controls=controls,
            )
        )
    return out


def write_probe_outputs(
    results: ProbeResults, out: str | Path, *, weights: dict[Any, Any] | None = None
) -> dict[str, Path]:
    """probes.json (everything), probes.csv (one row per label x condition x cell), splits.csv, heatmaps."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "probes.json", "csv": out / "probes.csv", "splits": out / "splits.csv"}
    summary = [row.to_json() for row in summary_rows(results)]
    atomic_write_bytes(paths["json"], json.dumps({**results.to_json(), "summary": summary}, indent=1).encode())
    atomic_write_bytes(paths["csv"], _csv(CSV_COLUMNS, [r.to_json() for r in results.results]))
    atomic_write_bytes(
        paths["splits"],
        _csv(("input_id", "split"), [{"input_id": i, "split": s} for i, s in results.split_by_image.items()]),
    )
    for label in results.labels:
        for condition in results.conditions():
            paths[f"heatmap_{label}_{condition}"] = out / safe_name(f"heatmap_{label}_{condition}.png")
            atomic_write_bytes(paths[f"heatmap_{label}_{condition}"], _heatmap_png(results, label, condition))
    weight_paths = (out / WEIGHTS_FILE, out / WEIGHTS_INDEX)
    if not weights:  # a rerun without linear probes: no earlier run's weights may stay beside it
        for path in weight_paths:
            path.unlink(missing_ok=True)
        return paths
    paths["weights"], paths["weights_index"] = weight_paths
    tensors, cells = {}, []
    for i, ((label, layer, t), entry) in enumerate(weights.items()):
        key = f"cell{i}"  # labels and layers may hold "/" (size/cm): the index names them, never the key
        tensors[key] = torch.from_numpy(np.ascontiguousarray(entry["coef"], dtype=np.float32))
        tensors[key + ".intercept"] = torch.from_numpy(np.ascontiguousarray(entry["intercept"], dtype=np.float32))
        cells.append({"label": label, "layer": layer, "t": int(t), "key": key, "classes": list(entry["classes"])})
    atomic_write_bytes(paths["weights"], safetensors_bytes(tensors))
    atomic_write_bytes(
        paths["weights_index"],
        json.dumps(
            {
                "cells": cells,
                "model": results.model,
                "space": "the store's rows as stored (pooled rows: one vector per location)",
                "rows": "one per class: the trained probe's logit weights on the raw features (standardisation "
                "folded in); a class's direction is its row minus the mean row",
            },
            indent=1,
        ).encode(),
    )
    return paths


def probe_section(report: Report, results: ProbeResults, title: str = "Probes: layers x timesteps") -> Section:
    s = report.section(title)
    split = results.split
    s.paragraph(
        f"A {results.head} probe per (layer, t) cell, on standardised features; the L2 strength "
        f"is chosen on the validation split, accuracy is measured once on the test split. Images per split: "
        f"{split.images} (split by {split.by}, every noise seed of an image together). Intervals: 95% "
        f"bootstrap over test images ({results.bootstrap} resamples). Headline cell per label "
        f"(and per control): {SELECTION}."
    )
    rows = []
    for r in summary_rows(results):
        shuffled, random_init = r.control("shuffled"), r.control("random_init")
        rows.append(
            [
                r.label,
                r.classes,
                f"{r.best_layer} @ t={r.best_t}",
                _pct(r.best_accuracy, r.ci),
                _num(shuffled.mean_accuracy if shuffled else None),
                _num(shuffled.chance_constant if shuffled else None),
                _num(shuffled.at_best_cell if shuffled else None),
                _pct(random_init.best_accuracy if random_init else None, random_init.ci if random_init else None),
                _num(random_init.at_best_cell if random_init else None),
                f"{r.chance_majority:.3f}",
                f"{r.test_max_accuracy:.3f} ({r.test_max_cell})",
                _num(random_init.test_max_accuracy if random_init else None),
            ]
        )
    s.table(
        [
            "label",
            "classes",
            "cell chosen on validation",
            "trained: test accuracy [95% CI]",
            "shuffled: mean over cells",
            "shuffled: its chance (constant predictor)",
            "shuffled: same cell",
            "random-init: its validation-chosen cell, test [95% CI]",
            "random-init: same cell",
            "majority class",
            "trained: max over cells of test accuracy (biased upwards)",
            "random-init: max over cells of test accuracy (biased upwards)",
        ],
        rows,
        "per label: the cell chosen on validation accuracy and its test accuracy, with its controls (each "
        "control's cell also chosen on its own validation accuracy); the max-over-cells columns are biased "
        "upwards and shown only for comparison",
    )
    for label in results.labels:
        for condition in results.conditions():
            s.image(_heatmap_png(results, label, condition), f"{label}: test accuracy per cell ({condition})")
    for item in results.skipped:
        s.note(f"skipped {item.condition} {item.layer} @ t={item.t}: {item.reason}")
    return s


def _heatmap_png(results: ProbeResults, label: str, condition: str) -> bytes:
    values, layers, timesteps = grid(results, label, condition)
    return heatmap(values, layers, [f"t={t}" for t in timesteps], f"{label} ({condition})", vmin=0, vmax=1)


def _pct(value: float | None, ci: list[float] | None) -> str:
    if value is None or ci is None:
        return "-"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _csv(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()
