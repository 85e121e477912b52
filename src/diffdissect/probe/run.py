"""`diffdissect probe`: a probe for every (layer, timestep) cell of a store, with splits, controls and CIs.

Features are read once from the store (one capture: one denoiser pass per image, seed and t covers
every layer). Cells with the same feature width are fitted together in one batched run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from diffdissect.devices import resolve_device
from diffdissect.errors import DataError
from diffdissect.models.identity import comparable
from diffdissect.probe.head import fit_attentive_head
from diffdissect.probe.labels import EncodedLabels, encode_labels
from diffdissect.probe.linear import DEFAULT_L2_GRID, fit_probe_tasks
from diffdissect.probe.results import LabelInfo, ProbeCell, ProbeResults, SkippedCell, SplitInfo
from diffdissect.probe.splits import SPLITS, Split, SplitConfig, split_from_column, split_images
from diffdissect.stats import bootstrap_mean_ci
from diffdissect.store import StoreReader, open_store


@dataclass
class ProbeConfig:
    labels: list[str]
    """label columns to probe, e.g. label shape colour"""
    layers: list[str] | None = None
    """layers to probe [every stored layer]"""
    timesteps: list[int] | None = None
    """timesteps to probe [every stored t]"""
    head: Literal["linear", "attentive"] = "linear"
    """linear: logistic regression on pooled features; attentive: a small head on spatial maps"""
    split: SplitConfig = field(default_factory=SplitConfig)
    """image fractions per split (train, val, test) and the salt of the split's hash"""
    split_column: str | None = None
    """use this store column's train/val/test values as the split"""
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID
    """L2 strengths to choose from on validation"""
    shuffled_control: bool = False
    """control: labels shuffled across images"""
    random_init_store: str | None = None
    """control: the same capture from `diffdissect capture --random-init`"""
    drop_missing: bool = False
    """probe without rows whose label is missing"""
    bootstrap: int = 2000
    """bootstrap resamples for the CIs"""
    seed: int = 0
    """seed of the shuffled control and the bootstrap"""
    max_iter: int = 500
    """optimiser iterations per linear probe"""
    batch_mb: float = 1024.0
    """feature memory per batched fit, in MB"""
    device: str = "cpu"
    """where the probes are fitted: cpu, cuda, cuda:N, mps"""
    solver: Literal["auto", "batched", "lbfgsb"] = "auto"
    """linear probes: lbfgsb (scipy per problem, warm-started down the L2 grid), batched (every cell at once),
    or auto (lbfgsb on the CPU, batched on an accelerator)"""

    def validate(self) -> None:
        if not self.labels:
            raise DataError("name at least one label column to probe (--labels shape colour ...)")
        if self.head not in ("linear", "attentive"):
            raise DataError(f"head must be 'linear' or 'attentive', not {self.head!r}")
        if not self.l2_grid or min(self.l2_grid) <= 0:
            raise DataError(f"the L2 grid must hold positive strengths; got {list(self.l2_grid)}")
        if self.solver not in ("auto", "batched", "lbfgsb"):
            raise DataError(f"solver must be auto, batched or lbfgsb, not {self.solver!r}")


@dataclass
class ProbeTask:
    """One label on one store: its rows, classes and split, ready to fit."""

    labels: EncodedLabels
    y: np.ndarray  # (rows,) class per row (shuffled for the shuffled control)
    split: Split
    rows: np.ndarray  # indices of rows with a label
    image_of_row: np.ndarray  # (rows,) image index, for the bootstrap over images
    seed_of_row: np.ndarray

    def part(self, name: str) -> np.ndarray:
        return self.rows[self.split.mask(name)[self.rows]]


def run_probes(
    store: str, config: ProbeConfig, *, progress: bool = True, weights: dict[Any, Any] | None = None
) -> ProbeResults:
    """Probe every requested cell for every label (plus the requested controls).

    `weights` (a dict), when given, receives the trained linear probes' weights on the raw features, per
    cell: {(label, layer, t): {"coef": (classes, d), "intercept": (classes,), "classes": [...]}}
    (`write_probe_outputs(..., weights=)` saves them; `steer` reads them as `probe:DIR#label=value`)."""
    config.validate()
    device = resolve_device(config.device)
    start = time.perf_counter()
    reader = open_store(store)
    cells = _cells(reader, config)
    _check_head(reader, cells, config)
    rows = reader.rows()
    split = (
        split_from_column(reader.column("input_id"), reader.column(config.split_column), config.split_column)
        if config.split_column
        else split_images(reader.column("input_id"), config.split)
    )
    images = {image: k for k, image in enumerate(dict.fromkeys(str(r["input_id"]) for r in rows))}
    image_of_row = np.array([images[str(r["input_id"])] for r in rows])
    seed_of_row = np.array([r.get("seed", 0) for r in rows])
    tasks = {name: _task(rows, name, split, image_of_row, seed_of_row, config) for name in config.labels}
    results: list[ProbeCell] = []
    skipped: list[SkippedCell] = []
    # tasks fitted together share features: the trained labels and their shuffled copies in one batched run
    batches: list[tuple[StoreReader, dict[tuple[str, str], ProbeTask]]] = [
        (reader, {("trained", n): t for n, t in tasks.items()})
    ]
    if config.shuffled_control:
        batches[0][1].update({("shuffled", n): _shuffled(t, config.seed) for n, t in tasks.items()})
    if config.random_init_store:
        control = open_store(config.random_init_store)
        batches.append((control, {("random_init", n): _aligned(t, reader, control) for n, t in tasks.items()}))
    for source, batch_tasks in batches:
        available = [c for c in cells if _has_cell(source, *c)]
        for condition in dict.fromkeys(c for c, _ in batch_tasks):
            skipped += [
                SkippedCell(condition, l, t, "cell not in the control store")
                for l, t in cells
                if (l, t) not in available
            ]
        for group, features in _feature_groups(source, available, config):
            for (condition, name), per_cell in _fit(features.to(device), batch_tasks, config).items():
                for cell, scores in zip(group, per_cell):
                    found = scores.pop("_weights", None)
                    if weights is not None and found is not None and condition == "trained":
                        weights[(name, cell[0], int(cell[1]))] = {**found, "classes": tasks[name].labels.classes}
                    results.append(
                        ProbeCell(label=name, layer=cell[0], t=cell[1], condition=condition, head=config.head, **scores)
                    )
            if progress:
                print(f"  fitted {len(group)} cells x {len(batch_tasks)} label tasks")
    return ProbeResults(
        store=str(store),
        model=comparable(reader.manifest.model or {}),
        config=_config_json(config),
        cells=cells,
        labels={n: LabelInfo(t.labels.classes, t.labels.missing) for n, t in tasks.items()},
        split=SplitInfo(config.split_column or "hash", split.spec.salt, split.counts()),
        split_by_image=split.by_image,
        results=results,
        skipped=skipped,
        seconds=round(time.perf_counter() - start, 2),
    )


# ---- inputs ---------------------------------------------------------------------------------------
def _cells(reader: StoreReader, config: ProbeConfig) -> list[tuple[str, int]]:
    layers = config.layers or reader.layers
    timesteps = config.timesteps or reader.timesteps
    for layer in layers:
        for t in timesteps:
            reader.manifest.check_slice(layer, t)  # a missing cell is an error naming what is stored
    return [(layer, int(t)) for layer in layers for t in timesteps]


def _check_head(reader: StoreReader, cells: list[tuple[str, int]], config: ProbeConfig) -> None:
    """The attentive head attends over spatial positions: refuse pooled layers before any work."""
    if config.head != "attentive":
        return
    for layer in dict.fromkeys(layer for layer, _ in cells):
        shape = tuple(reader.shape(layer))
        if len(shape) != 3:
            raise DataError(
                f"--head attentive needs spatial activations (channels, height, width) per row, but layer "
                f"{layer!r} of the store is stored with shape {shape} (pooled or tokens, no spatial map). "
                "Capture it without pooling (--pooling none), or use --head linear."
            )


def _has_cell(reader: StoreReader, layer: str, t: int) -> bool:
    return layer in reader.layers and t in reader.timesteps


def _task(
    rows: list[dict[str, Any]],
    name: str,
    split: Split,
    image_of_row: np.ndarray,
    seed_of_row: np.ndarray,
    config: ProbeConfig,
) -> ProbeTask:
    labels = encode_labels(rows, name, drop_missing=config.drop_missing)
    task = ProbeTask(labels, labels.y.copy(), split, np.nonzero(labels.present)[0], image_of_row, seed_of_row)
    classes = len(labels.classes)
    for part in SPLITS:
        n_images = len(np.unique(task.image_of_row[task.part(part)]))
        if n_images < classes:
            raise DataError(
                f"the {part} split has {n_images} images with a {name!r} label but {name!r} has "
                f"{classes} classes; a probe split needs at least one image per class. Capture more "
                "images or change the split fractions (--split)"
            )
    return task


def _shuffled(task: ProbeTask, seed: int) -> ProbeTask:
    """Labels permuted across images (all rows of an image keep one label): the chance control."""
    n_images = task.image_of_row.max() + 1
    label_of_image = np.full(n_images, -1)
    label_of_image[task.image_of_row[task.rows]] = task.y[task.rows]
    labelled = np.nonzero(label_of_image >= 0)[0]
    permuted = label_of_image.copy()
    permuted[labelled] = label_of_image[np.random.default_rng(seed + 7).permutation(labelled)]
    y = task.y.copy()
    y[task.rows] = permuted[task.image_of_row[task.rows]]
    return ProbeTask(task.labels, y, task.split, task.rows, task.image_of_row, task.seed_of_row)


def _aligned(task: ProbeTask, reader: StoreReader, control: StoreReader) -> ProbeTask:
    """The task re-indexed onto a control store's rows, matched by (input id, seed)."""
    key = lambda r: (str(r["input_id"]), int(r.get("seed", 0)))  # noqa: E731
    position = {key(r): i for i, r in enumerate(control.rows())}
    ours = reader.rows()
    missing = [key(ours[i]) for i in task.rows if key(ours[i]) not in position]
    if missing:
        raise DataError(
            f"the random-init store {control.directory} lacks {len(missing)} of the probed (input, seed) "
            f"rows (e.g. {missing[:3]}); capture the same inputs, seeds and --limit with --random-init"
        )
    n = control.num_rows
    order = np.array([position[key(ours[i])] for i in task.rows])

    def moved(values: np.ndarray, fill: Any) -> np.ndarray:
        out = np.full(n, fill, dtype=values.dtype)
        out[order] = values[task.rows]
        return out

    split = Split(task.split.spec, task.split.by_image, moved(task.split.row_split, "none"))
    return ProbeTask(
        task.labels, moved(task.y, -1), split, np.sort(order), moved(task.image_of_row, -1), moved(task.seed_of_row, -1)
    )


def _feature_groups(
    reader: StoreReader, cells: list[tuple[str, int]], config: ProbeConfig
) -> Iterator[tuple[list[tuple[str, int]], torch.Tensor]]:
    """Yield (cells, features) with features (C, rows, d) pooled, or (C, rows, ch, h, w) for the head."""
    by_width: dict[tuple[int, ...], list[tuple[str, int]]] = {}
    for layer, t in cells:
        shape = reader.shape(layer)
        width = shape if config.head == "attentive" else shape[:1]
        by_width.setdefault(tuple(width), []).append((layer, t))
    for width, group in by_width.items():
        per_cell_mb = reader.num_rows * int(np.prod(width)) * 4 / 2**20
        step = max(1, int(config.batch_mb // max(per_cell_mb, 1e-9)))
        for i in range(0, len(group), step):
            part = group[i : i + step]
            blocks = []
            for layer, t in part:
                x = reader.load(layer, t, format="torch", dtype="float32")
                if config.head == "linear" and x.dim() > 2:
                    x = x.flatten(2).mean(-1)  # spatial maps are mean-pooled for the linear probe
                blocks.append(x)
            yield part, torch.stack(blocks)


# ---- fitting and scoring -------------------------------------------------------------------------
def _fit(features: torch.Tensor, tasks: dict[Any, ProbeTask], config: ProbeConfig) -> dict[Any, list[dict[str, Any]]]:
    """Scores per task, one per cell. Linear probes: every cell x task x L2 strength in one batched fit."""
    if config.head == "attentive":
        return {name: _fit_heads(features, task, config) for name, task in tasks.items()}
    split = next(iter(tasks.values())).split  # tasks fitted together share one split
    parts = {p: np.nonzero(split.mask(p))[0] for p in SPLITS}
    present = {name: {p: np.isin(rows, task.rows) for p, rows in parts.items()} for name, task in tasks.items()}
    names = list(tasks)

    def labels(part: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([tasks[n].y[parts[part]] for n in names]))

    def masks(part: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([present[n][part] for n in names]))

    fit = fit_probe_tasks(
        features[:, parts["train"]],
        labels("train"),
        features[:, parts["val"]],
        labels("val"),
        features[:, parts["test"]],
        [len(tasks[n].labels.classes) for n in names],
        train_mask=masks("train"),
        val_mask=masks("val"),
        l2_grid=config.l2_grid,
        max_iter=config.max_iter,
        solver=config.solver,
    )
    out: dict[Any, list[dict[str, Any]]] = {}
    for t, name in enumerate(names):
        task, keep = tasks[name], present[name]["test"]
        n_classes = len(task.labels.classes)
        out[name] = [
            {
                **_score(fit.test_pred[c, t][keep], task, task.part("test"), n_classes, config),
                "l2": float(fit.chosen_l2[c, t]),
                "val_accuracy": float(fit.val_accuracy[c, fit.chosen[c, t], t]),
                "train_accuracy": float(fit.train_accuracy[c, t]),
                "converged": fit.converged,
                "solver": fit.solver,
                "_weights": _cell_weights(fit, c, t, n_classes),
            }
            for c in range(len(features))
        ]
    return out


def _cell_weights(fit: Any, c: int, t: int, n_classes: int) -> dict[str, np.ndarray] | None:
    if fit.coef is None or fit.intercept is None:
        return None
    return {"coef": fit.coef[c, t, :n_classes], "intercept": fit.intercept[c, t, :n_classes]}


def _fit_heads(features: torch.Tensor, task: ProbeTask, config: ProbeConfig) -> list[dict[str, Any]]:
    train, val, test = (task.part(p) for p in SPLITS)
    y = torch.from_numpy(task.y).to(features.device)
    n_classes = len(task.labels.classes)
    out = []
    for c in range(len(features)):
        fit = fit_attentive_head(
            features[c, train], y[train], features[c, val], y[val], features[c, test], n_classes, seed=config.seed
        )
        out.append(
            {
                **_score(fit.test_pred, task, test, n_classes, config),
                "l2": None,
                "val_accuracy": fit.val_accuracy,
                "train_accuracy": fit.train_accuracy,
                "best_epoch": fit.best_epoch,
            }
        )
    return out


def _score(pred: np.ndarray, task: ProbeTask, test: np.ndarray, n_classes: int, config: ProbeConfig) -> dict[str, Any]:
    correct = (np.asarray(pred) == task.y[test]).astype(np.float64)
    images, inverse = np.unique(task.image_of_row[test], return_inverse=True)
    per_image = np.bincount(inverse, weights=correct) / np.bincount(inverse)
    low, high = bootstrap_mean_ci(per_image, resamples=config.bootstrap, seed=config.seed)
    seeds = task.seed_of_row[test]
    per_seed = {int(s): float(correct[seeds == s].mean()) for s in np.unique(seeds)}
    counts = np.bincount(task.y[test], minlength=n_classes)
    train_majority = np.bincount(task.y[task.part("train")], minlength=n_classes).argmax()
    return {
        "accuracy": float(per_image.mean()),
        "ci_low": low,
        "ci_high": high,
        "seed_accuracy": per_seed,
        "seed_std": float(np.std(list(per_seed.values()))) if len(per_seed) > 1 else None,
        "chance_uniform": 1.0 / n_classes,
        "chance_majority": float(counts.max() / counts.sum()),
        # a constant predictor of the training split's majority class, scored on this test split
        "chance_constant": float(counts[train_majority] / counts.sum()),
        "n_train_images": _images(task, "train"),
        "n_val_images": _images(task, "val"),
        "n_test_images": int(len(images)),
    }


def _images(task: ProbeTask, part: str) -> int:
    return int(len(np.unique(task.image_of_row[task.part(part)])))


def _config_json(config: ProbeConfig) -> dict[str, Any]:
    data = asdict(config)
    data["l2_grid"] = list(config.l2_grid)
    return data
