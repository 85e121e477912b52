"""What each SAE latent responds to, on held-out images: top images, where it fires, label purity, AUROC.

Per image, a latent's activation is its code on the pooled row, or (per-location SAEs) its largest
code over the image's locations, with the location map kept for the top images. Purity of a latent's
top-n images is reported as entropy (bits) and majority-class share, each beside the same statistic
for n images drawn at random (the shuffled-label baseline), and as Revelio's sigma (the standard
deviation of integer class ids) for comparison with its paper only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from diffdissect.probe.labels import is_missing
from diffdissect.probe.labels import label_columns as store_label_columns
from diffdissect.sae.checkpoint import check_d_in, load_sae
from diffdissect.sae.data import SliceData
from diffdissect.store import open_store

MAX_MAP_VALUES = 64_000_000


@dataclass
class ImageActivations:
    rows: np.ndarray             # (n,) store row ids of the held-out rows
    values: np.ndarray           # (n, n_latents) per-image activation
    maps: np.ndarray | None      # (n, n_latents, h, w) for per-location SAEs with small dictionaries, else None
    map_shape: tuple[int, int] | None


@torch.no_grad()
def image_activations(sae, data: SliceData, *, keep_maps: bool = True) -> ImageActivations:
    """Activations of every held-out row (all of its tokens)."""
    rows, values, maps = [], [], []
    shape = data.reader.shape(data.layer)
    map_shape = tuple(shape[1:]) if data.tokens else None
    for block, ids in data.reader.iter_batches(data.layer, data.t, 256, format="torch", with_rows=True, dtype="float32"):
        keep = torch.from_numpy(~data.train_rows[ids])
        if not keep.any():
            continue
        block = block[keep]
        n = len(block)
        x = block.flatten(2).transpose(1, 2).reshape(-1, block.shape[1]) if data.tokens else (
            block.flatten(2).mean(-1) if block.dim() > 2 else block)
        codes, _ = sae.encode(x)
        dense = sae.dense_codes(codes).view(n, -1, sae.config.n_latents)       # (n, locations, latents)
        values.append(dense.amax(1).numpy())
        if data.tokens and keep_maps:
            maps.append(dense.permute(0, 2, 1).reshape(n, sae.config.n_latents, *map_shape).half().numpy())
        rows.append(ids[keep.numpy()])
    return ImageActivations(np.concatenate(rows), np.concatenate(values),
                            np.concatenate(maps) if maps else None, map_shape)


def auroc_table(values: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC of every latent (column of `values`) for every class of `labels`: {class: (n_latents,)}.

    Mann-Whitney with mid-ranks for ties: a latent that never fires scores 0.5.
    """
    ranks = rankdata(values, axis=0)
    out = {}
    for value in np.unique(labels):
        positive = labels == value
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        out[str(value)] = (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def purity(labels: Sequence[Any]) -> dict[str, float]:
    """Entropy (bits) and majority share of a list of labels; Revelio's sigma of their class ids."""
    values, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    p = counts / counts.sum()
    return {"entropy": float(-(p * np.log2(p)).sum()), "majority": float(p.max()), "majority_label": str(values[p.argmax()])}


def random_purity(labels: np.ndarray, n: int, *, draws: int = 500, seed: int = 0) -> dict[str, float]:
    """The purity statistics of n images drawn at random (= top-n under shuffled labels): mean and sd."""
    rng = np.random.default_rng(seed)
    stats = [purity(labels[rng.choice(len(labels), n, replace=False)]) for _ in range(draws)]
    return {f"{k}_{s}": float(getattr(np, s)([x[k] for x in stats])) for k in ("entropy", "majority") for s in ("mean", "std")}


def revelio_sigma(class_ids: np.ndarray) -> float:
    """Revelio's purity: the standard deviation of integer class ids (order-dependent; for comparison only)."""
    return float(np.std(class_ids))


def analyse_features(sae_dir: str | Path, *, store: str | Path | None = None, label_columns: Sequence[str] | None = None,
                     top_n: int = 16, seed: int = 0) -> tuple[dict[str, Any], ImageActivations, list[dict[str, Any]]]:
    """Per-latent frequency, top held-out images, purity vs the random baseline, AUROC per factor value.

    Returns (results as plain data, the held-out activations, the held-out rows of the store index).
    """
    sae, info = load_sae(sae_dir)
    reader = open_store(store or info["slice"]["store"])
    train = info["train"]
    data = SliceData(reader, train["layer"], train["t"], train["tokens"], train["heldout_fraction"])
    check_d_in(Path(sae_dir), info, data.d_in)            # a clear error if the slice changed under it
    acts = image_activations(sae, data)
    row_index = reader.rows()
    held = [row_index[r] for r in acts.rows]
    columns = list(label_columns) if label_columns is not None else store_label_columns(held)
    labels = {c: np.array([str(r.get(c)) for r in held], dtype=object) for c in columns
              if not any(is_missing(r.get(c)) for r in held)}
    n = min(top_n, len(held))
    baselines = {c: random_purity(v, n, seed=seed) for c, v in labels.items() if n > 0}
    aurocs = {c: auroc_table(acts.values, v) for c, v in labels.items()}
    frequency = (acts.values > 0).mean(0)
    latents = []
    for j in range(sae.config.n_latents):
        order = np.argsort(-acts.values[:, j], kind="stable")[:n]
        order = order[acts.values[order, j] > 0]
        entry: dict[str, Any] = {"latent": j, "image_frequency": float(frequency[j]),
                                 "max_activation": float(acts.values[:, j].max()) if len(held) else 0.0,
                                 "top": [int(i) for i in order], "purity": {}}
        for c, v in labels.items():
            if len(order):
                classes = {name: k for k, name in enumerate(sorted(set(v)))}
                entry["purity"][c] = {**purity(v[order]), "revelio_sigma": revelio_sigma(
                    np.array([classes[x] for x in v[order]])), "n": int(len(order))}
        entry["auroc"] = {c: {value: float(a[j]) for value, a in table.items()} for c, table in aurocs.items()}
        latents.append(entry)
    best = {c: {value: {"latent": int(a.argmax()), "auroc": float(a.max())} for value, a in table.items()}
            for c, table in aurocs.items()}
    values_total = sum(len(v) for v in best.values())
    covered = sum(1 for v in best.values() for x in v.values() if x["auroc"] >= 0.95)
    return {"sae": str(sae_dir), "slice": info["slice"], "config": info["sae"], "metrics": info.get("metrics"),
            "heldout_images": len(held), "heldout_source_index": [int(r.get("source_index", i)) for i, r in enumerate(held)],
            "top_n": n, "labels": list(labels), "baselines": baselines,
            "best_latent_per_value": best, "values_with_auroc_ge_0.95": covered, "values_total": values_total,
            "latents": latents}, acts, held
