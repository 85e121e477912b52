"""What an SAE latent stands for, with selection on one split, a null for the max, places and words.

Consumes arrays only (per-image activations, per-location maps, labels, object masks, captions), so any
pass that produces them (today's `image_activations`, a streaming pass) can feed it.

* Best latent per factor value, held out: the held-out images are split in two halves by image
  (`halves`); the latent is chosen on half A by its AUROC and reported by its AUROC on half B, with a
  p-value from permuting the labels of half B (one latent, no max: an exact test). The max over all
  latents on all held-out images (the old figure) is kept beside it, biased upwards, with the
  permutation distribution of that max (labels shuffled across images, every latent rescored).
* Per location: a location is positive for a factor value when it lies inside the object (the image's
  mask resized to the layer's grid) of an image with that value; every other location (background, and
  objects of other values) is negative. The same A/B selection and null apply, permuting labels across
  images (masks stay with their images). Localisation of a latent: the IoU of where it fires with the
  object mask, pooled over the images where it fires (firing: above half its peak over the images).
* Words: for each latent, the words of its top-n images' captions against all held-out captions; a
  hypergeometric p-value (enrichment) per (latent, word), Benjamini-Hochberg q-values across the whole
  table. The caption label of a latent is its enriched words, best first.

AUROC is Mann-Whitney with mid-ranks for ties (a latent that never fires scores 0.5); ranks are taken
once per image set and labels only pick rows, so each permutation is one matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import hypergeom, rankdata

from diffdissect.data.words import words_of
from diffdissect.stats import benjamini_hochberg

STOP_WORDS = frozenset({"a", "an", "the", "at", "of", "and", "in", "on", "with", "to", "is"})


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of the held-out latent attribution (features.json's `heldout`, `per_location`, `words`)."""

    split_seed: int = 0
    """seed of the split of the held-out images into half A (choose the latent) and half B (report it)"""
    permutations: int = 200
    """label permutations for the null of the max over latents and for the chosen latent's p-value"""
    auroc_target: float = 0.95
    """a factor value counts as covered when its held-out AUROC reaches this"""
    word_top_n: int = 16
    """top-activating images per latent whose caption words are tested for enrichment"""
    fdr: float = 0.05
    """Benjamini-Hochberg level below which a caption word labels a latent"""
    max_words: int = 5
    """enriched words kept per latent (best q first)"""
    mask_threshold: float = 0.5
    """a grid cell is inside the object when the mask covers at least this fraction of it"""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- splits and AUROC -------------------------------------------------------------------------------
def split_halves(n: int, seed: int = 0) -> np.ndarray:
    """(n,) bool: True for half A (where latents are chosen), False for half B (where they are scored)."""
    a = np.zeros(n, bool)
    a[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    return a


def _rank_sums(values: np.ndarray, owner: np.ndarray | None, n_images: int) -> np.ndarray:
    """Mid-ranks of every latent over the rows of `values` (n_rows, L), summed per image (`owner`: the image of
    each row, None: one row per image) -> (n_images, L)."""
    ranks = rankdata(values, axis=0)
    if owner is None:
        return ranks
    out = np.zeros((n_images, values.shape[1]))
    np.add.at(out, owner, ranks)
    return out


def _auroc_from_sums(pick: np.ndarray, sums: np.ndarray, weights: np.ndarray, n_rows: int) -> np.ndarray:
    """AUROC per latent for the positives picked by `pick` (..., n_images) 0/1: rank sums of their rows
    against all other rows. `weights`: rows per image that count as positive (1 per image, or object cells)."""
    n_pos = pick @ weights
    n_neg = n_rows - n_pos
    rank_sum = pick @ sums
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (rank_sum - (n_pos * (n_pos + 1) / 2)[..., None]) / (n_pos * n_neg)[..., None]
    return np.where(((n_pos > 0) & (n_neg > 0))[..., None], out, np.nan)


class _Scorer:
    """AUROC of every latent for any labelling of a fixed set of images, per image or per location."""

    def __init__(self, values: np.ndarray, cells: np.ndarray | None = None):
        """`values`: (n, L) per-image scores, or (n, L, h, w) maps with `cells` (n, h, w) bool object masks."""
        self.n = len(values)
        if cells is None:
            self.sums = _rank_sums(values, None, self.n)
            self.weights = np.ones(self.n)
            self.rows = self.n
        else:
            n, n_latents = values.shape[:2]
            flat = values.reshape(n, n_latents, -1).transpose(0, 2, 1).reshape(-1, n_latents)  # (n*hw, L)
            ranks = rankdata(flat, axis=0).reshape(n, -1, n_latents)
            inside = cells.reshape(n, -1).astype(np.float64)
            self.sums = np.einsum("nc,ncl->nl", inside, ranks)
            self.weights = inside.sum(1)
            self.rows = flat.shape[0]

    def auroc(self, pick: np.ndarray) -> np.ndarray:
        return _auroc_from_sums(pick.astype(np.float64), self.sums, self.weights, self.rows)


def auroc_per_value(values: np.ndarray, labels: np.ndarray, cells: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{value: (L,) AUROC} for every value of `labels` (per image, or per location with `cells`)."""
    scorer = _Scorer(values, cells)
    labels = np.asarray(labels).astype(str)
    return {str(v): scorer.auroc(labels == v) for v in np.unique(labels)}


def _null_of_max(
    scorer: _Scorer, labels: np.ndarray, values: list[str], permutations: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Per value, the max over latents of the AUROC with labels permuted across images: (permutations,)."""
    perms = np.stack([rng.permutation(labels) for _ in range(permutations)])  # (P, n)
    return {v: np.nanmax(scorer.auroc(perms == v), axis=-1) for v in values}


def best_latents(
    values: np.ndarray,
    labels: np.ndarray,
    halves: np.ndarray,
    *,
    cells: np.ndarray | None = None,
    permutations: int = 200,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per factor value: the latent chosen on half A, its AUROC on half B (the figure to report) with a
    permutation p-value; and the old figure, the max over latents on all images, with its permutation null."""
    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng(seed)
    names = [str(v) for v in np.unique(labels)]
    split = {}
    for part, rows in (("A", halves), ("B", ~halves)):
        split[part] = (_Scorer(values[rows], cells[rows] if cells is not None else None), labels[rows])
    whole = _Scorer(values, cells)
    null_max = _null_of_max(whole, labels, names, permutations, rng)
    scorer_b, labels_b = split["B"]
    perms_b = np.stack([rng.permutation(labels_b) for _ in range(permutations)])
    out = {}
    for v in names:
        on_a = split["A"][0].auroc(split["A"][1] == v)
        on_b = scorer_b.auroc(labels_b == v)
        if np.all(np.isnan(on_a)) or np.all(np.isnan(on_b)):
            continue  # the value is missing from a half: nothing to choose or report
        chosen = int(np.nanargmax(on_a))
        null_b = scorer_b.auroc(perms_b == v)[:, chosen]
        observed = float(on_b[chosen])
        everywhere = whole.auroc(labels == v)
        top = float(np.nanmax(everywhere))
        out[v] = {
            "latent": chosen,
            "auroc_chosen_on": float(on_a[chosen]),
            "auroc": observed,
            "p_value": float((1 + np.sum(null_b >= observed - 1e-12)) / (1 + permutations)),
            "n_positive_images_b": int((labels_b == v).sum()),
            "max_over_latents": {
                "latent": int(np.nanargmax(everywhere)),
                "auroc": top,
                "null_mean": float(null_max[v].mean()),
                "null_q95": float(np.quantile(null_max[v], 0.95)),
                "p_value": float((1 + np.sum(null_max[v] >= top - 1e-12)) / (1 + permutations)),
            },
        }
    return out


def coverage(best: dict[str, dict[str, dict[str, Any]]], target: float) -> dict[str, int]:
    """How many factor values reach `target`: held out (chosen on A, scored on B) and as the max (biased)."""
    entries = [e for table in best.values() for e in table.values()]
    return {
        "values_total": len(entries),
        "heldout": sum(e["auroc"] >= target for e in entries),
        "max_over_latents": sum(e["max_over_latents"]["auroc"] >= target for e in entries),
    }


# ---- places -----------------------------------------------------------------------------------------
def grid_masks(masks: np.ndarray, grid: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """(n, H, W) object coverage in [0, 1] -> (n, h, w) bool at the layer's grid: the covered fraction of each
    cell (area average) >= `threshold`; an object smaller than that keeps its most covered cell."""
    masks = np.asarray(masks, np.float64)
    n, height, width = masks.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"masks of {height}x{width} do not tile the layer's {h}x{w} grid")
    fraction = masks.reshape(n, h, height // h, w, width // w).mean((2, 4))
    cells = fraction >= threshold
    empty = ~cells.reshape(n, -1).any(1) & (fraction.reshape(n, -1).max(1) > 0)
    if empty.any():
        flat = cells.reshape(n, -1)
        flat[np.nonzero(empty)[0], fraction.reshape(n, -1)[empty].argmax(1)] = True
    return cells


def localisation(maps: np.ndarray, cells: np.ndarray, *, level: float = 0.5) -> dict[str, np.ndarray]:
    """Per latent: IoU of where it fires (code above `level` x its peak over all images; a TopK SAE gives every
    location some latents, so weak codes are not counted) with the object cells, pooled over the images where it
    fires, and the share of its total activation that falls inside the object. `maps`: (n, L, h, w)."""
    peak = maps.max(axis=(0, 2, 3))[None, :, None, None]
    fires = (maps > 0) & (maps >= level * peak)
    inside = cells[:, None]
    fired_images = fires.reshape(*fires.shape[:2], -1).any(-1)  # (n, L)
    intersection = (fires & inside).sum((2, 3))
    union = ((fires | inside) & fired_images[..., None, None]).sum((2, 3))
    total = maps.astype(np.float64).clip(min=0).sum((0, 2, 3))
    within = (maps.astype(np.float64).clip(min=0) * inside).sum((0, 2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection.sum(0) / union.sum(0)
        share = within / total
    return {"iou": np.nan_to_num(iou), "inside_share": np.nan_to_num(share)}


# ---- words ------------------------------------------------------------------------------------------
def caption_words(captions: Sequence[str | None]) -> tuple[list[str], np.ndarray]:
    """(vocabulary, (n, V) bool): which held-out captions contain each word (stop words left out)."""
    sets = [set(words_of(c)) - STOP_WORDS if c else set() for c in captions]
    vocabulary = sorted(set().union(*sets)) if sets else []
    index = {w: j for j, w in enumerate(vocabulary)}
    matrix = np.zeros((len(sets), len(vocabulary)), bool)
    for i, s in enumerate(sets):
        matrix[i, [index[w] for w in s]] = True
    return vocabulary, matrix


def word_enrichment(
    values: np.ndarray, captions: Sequence[str | None], *, top_n: int = 16, fdr: float = 0.05, max_words: int = 5
) -> dict[str, Any]:
    """Per latent (column of `values`, (n, L) per-image activations): the words enriched in the captions of its
    top-n firing images against all captioned images; hypergeometric p, BH q over the whole (latent, word) table."""
    has = np.array([c is not None and c != "" for c in captions])
    vocabulary, words = caption_words([c if ok else None for c, ok in zip(captions, has)])
    values = np.asarray(values)[has]
    words = words[has]
    n_images, n_latents = values.shape
    if not vocabulary or n_images == 0:
        return {"vocabulary": vocabulary, "tests": 0, "latents": [[] for _ in range(n_latents)]}
    order = np.argsort(-values, axis=0, kind="stable")[:top_n]  # (top_n, L)
    fired = np.take_along_axis(values, order, 0) > 0
    n_top = fired.sum(0)  # (L,)
    hits = np.zeros((n_latents, len(vocabulary)))
    for j in range(n_latents):
        hits[j] = words[order[fired[:, j], j]].sum(0)
    totals = words.sum(0)  # (V,)
    p = hypergeom.sf(hits - 1, n_images, totals[None], n_top[:, None])
    p = np.where(n_top[:, None] > 0, p, 1.0)
    q = benjamini_hochberg(p)
    with np.errstate(invalid="ignore", divide="ignore"):
        enrichment = (hits / np.maximum(n_top, 1)[:, None]) / (totals[None] / n_images)
    latents = []
    for j in range(n_latents):
        keep = np.nonzero((q[j] < fdr) & (hits[j] > 0))[0]
        keep = keep[np.lexsort((-enrichment[j, keep], q[j, keep]))][:max_words]
        latents.append(
            [
                {
                    "word": vocabulary[w],
                    "in_top": int(hits[j, w]),
                    "top": int(n_top[j]),
                    "in_all": int(totals[w]),
                    "enrichment": round(float(enrichment[j, w]), 3),
                    "p": float(p[j, w]),
                    "q": float(q[j, w]),
                }
                for w in keep
            ]
        )
    return {
        "vocabulary": vocabulary,
        "tests": int(p.size),
        "images": int(n_images),
        "top_n": top_n,
        "fdr": fdr,
        "latents": latents,
    }


def labels_named(best: dict[str, dict[str, dict[str, Any]]], words: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """For each factor value: does its held-out best latent's caption label (its most enriched word) name it?"""
    per_value = {}
    for factor, table in best.items():
        for value, entry in table.items():
            label = [w["word"] for w in words[entry["latent"]]]
            per_value[f"{factor}={value}"] = {
                "latent": entry["latent"],
                "label": label[:3],
                "top_word_names_it": bool(label) and label[0] == value.lower(),
                "named_in_label": value.lower() in label,
            }
    return {
        "values": per_value,
        "top_word_names_it": sum(v["top_word_names_it"] for v in per_value.values()),
        "named_in_label": sum(v["named_in_label"] for v in per_value.values()),
        "values_total": len(per_value),
    }
