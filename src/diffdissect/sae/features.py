"""What each SAE latent responds to, on held-out images: top images, where it fires, label purity, AUROC.

Per image, a latent's activation is its code on the pooled row, or (per-location SAEs) its largest
code over the image's locations, with the location map kept for the top images. Purity of a latent's
top-n images is reported as entropy (bits) and majority-class share, each beside the same statistic
for n images drawn at random (the shuffled-label baseline), and as Revelio's sigma (the standard
deviation of integer class ids) for comparison with its paper only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from diffdissect.devices import resolve_device
from diffdissect.probe.labels import is_missing
from diffdissect.probe.labels import label_columns as store_label_columns
from diffdissect.sae.attribution import (
    AttributionConfig,
    best_latents,
    coverage,
    grid_masks,
    labels_named,
    localisation,
    split_halves,
    word_enrichment,
)
from diffdissect.sae.checkpoint import check_d_in, load_sae
from diffdissect.sae.data import SliceData
from diffdissect.store import open_store

MAX_MAP_VALUES = 64_000_000  # every held-out map (images x latents x locations) is kept only under this many values


@dataclass
class FeaturesConfig:
    """Options of `sae features` (the feature analysis of one trained SAE)."""

    top_n: int = 16
    """top held-out images kept per latent"""
    device: str = "cpu"
    """where the codes are computed: cpu, cuda, cuda:N, mps (the SAE loads there, whatever it was trained on)"""
    max_map_values: int = MAX_MAP_VALUES
    """keep every held-out activation map (for per-location scores) only when images x latents x locations is at
    most this; the maps of each latent's top images are always kept"""
    batch_tokens: int = 8192
    """tokens encoded per batch (a batch's pre-activations take tokens x latents x 4 bytes; whole rows, at least one)"""
    seed: int = 0
    """seed of the random-purity baseline"""


@dataclass
class ImageActivations:
    """What one pass over the held-out rows keeps (never a dense tokens x latents code matrix).

    Memory: `values` is 4 bytes per held-out image and latent; `top`/`top_maps` are independent of the
    held-out count; `maps` exists only when it fits under `max_map_values`.
    """

    rows: np.ndarray  # (n,) store row ids of the held-out rows
    values: np.ndarray  # (n, n_latents) per-image activation: the code (pooled) or max over locations
    top: np.ndarray  # (n_latents, top_n) positions (into rows) of each latent's top images, best first
    top_maps: np.ndarray | None  # (n_latents, top_n, h, w) float16 maps of each latent on its top images
    maps: np.ndarray | None  # (n, n_latents, h, w) float16 every held-out map, if under the cap, else None
    map_shape: tuple[int, ...] | None

    def map_of(self, position: int, latent: int) -> np.ndarray | None:
        """The activation map of `latent` on held-out image `position` (None if not kept)."""
        if self.maps is not None:
            return self.maps[position, latent]
        if self.top_maps is None:
            return None
        where = np.flatnonzero(self.top[latent] == position)
        return self.top_maps[latent, where[0]] if len(where) else None


def _per_image(sae, block: torch.Tensor, tokens: bool, device: torch.device):
    """Encode one batch of held-out rows: sparse codes of every token, the image of each token, its location."""
    x = block.to(device, torch.float32)
    n = len(x)
    if tokens:
        locations = int(np.prod(x.shape[2:]))
        x = x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])
    else:
        locations = 1
        x = x.flatten(2).mean(-1) if x.dim() > 2 else x
    codes, _ = sae.encode(x)
    image = torch.arange(n, device=device).repeat_interleave(locations)
    location = torch.arange(locations, device=device).repeat(n)
    return codes, image, location, n, locations


@torch.no_grad()
def image_activations(
    sae, data: SliceData, config: FeaturesConfig | None = None, *, keep_maps: bool = True
) -> ImageActivations:
    """One streaming pass over the held-out rows (plus a pass over just the top images for their maps).

    Per batch, the per-image activation is a scatter-max of the sparse codes (k per token), on the
    SAE's device; no (tokens x latents) matrix is built.
    """
    config = config or FeaturesConfig()
    device = sae.W_dec.device
    n_latents = sae.config.n_latents
    shape = data.reader.shape(data.layer)
    map_shape = tuple(shape[1:]) if data.tokens else None
    locations = int(np.prod(map_shape)) if map_shape else 1
    held = np.flatnonzero(data.heldout_rows)
    values = torch.zeros(len(held), n_latents, dtype=torch.float32, device="cpu")
    all_maps = bool(data.tokens and keep_maps and len(held) * n_latents * locations <= config.max_map_values)
    maps = torch.zeros(len(held), n_latents, locations, dtype=torch.float16, device="cpu") if all_maps else None
    at = 0
    for block in data.reader.iter_batches(
        data.layer, data.t, max(1, config.batch_tokens // locations), format="torch", select=data.heldout_rows
    ):
        codes, image, location, n, _ = _per_image(sae, block, data.tokens, device)
        flat = (image[:, None] * n_latents + codes.indices).flatten()
        per_image = torch.zeros(n * n_latents, dtype=torch.float32, device=device)
        per_image.scatter_reduce_(0, flat, codes.values.flatten(), "amax")
        values[at : at + n] = per_image.view(n, n_latents).cpu()
        if maps is not None:
            spot = ((image[:, None] * n_latents + codes.indices) * locations + location[:, None]).flatten()
            maps.view(-1).index_put_((spot.cpu() + at * n_latents * locations,), codes.values.flatten().half().cpu())
        at += n
    top_n = min(config.top_n, len(held))
    top = (
        values.topk(top_n, dim=0).indices.t().contiguous()
        if top_n
        else torch.zeros(n_latents, 0, dtype=torch.long, device="cpu")
    )
    top_maps = None
    if data.tokens and keep_maps:
        top_maps = (
            maps.view(len(held), n_latents, locations)[top, torch.arange(n_latents, device="cpu")[:, None]]
            if maps is not None
            else _top_maps(sae, data, config, held, top, locations, device)
        )
        top_maps = top_maps.view(n_latents, top_n, *map_shape).numpy()
    return ImageActivations(
        held,
        values.numpy(),
        top.numpy(),
        top_maps,
        maps.view(len(held), n_latents, *map_shape).numpy() if maps is not None else None,
        map_shape,
    )


def _top_maps(
    sae,
    data: SliceData,
    config: FeaturesConfig,
    held: np.ndarray,
    top: torch.Tensor,
    locations: int,
    device: torch.device,
) -> torch.Tensor:
    """(n_latents, top_n, locations) maps of each latent on its top images: a second pass over those images only."""
    n_latents, top_n = top.shape
    out = torch.zeros(n_latents * top_n * locations, dtype=torch.float16, device="cpu")
    wanted = np.zeros(data.reader.num_rows, dtype=bool)
    wanted[held[np.unique(top.numpy())]] = True
    position_of_row = np.full(data.reader.num_rows, -1)
    position_of_row[held] = np.arange(len(held))
    # rank[j, position] = r where top[j, r] == position, else -1; one entry per (latent, held-out image) pair kept
    pairs_latent = torch.arange(n_latents, device="cpu").repeat_interleave(top_n)
    pairs_rank = torch.arange(top_n, device="cpu").repeat(n_latents)
    pairs_position = top.flatten()
    for block, ids in data.reader.iter_batches(
        data.layer, data.t, max(1, config.batch_tokens // locations), format="torch", with_rows=True, select=wanted
    ):
        codes, image, location, n, _ = _per_image(sae, block, data.tokens, device)
        positions = torch.from_numpy(position_of_row[ids])
        local = torch.full((len(held),), -1, dtype=torch.long, device="cpu")
        local[positions] = torch.arange(n, device="cpu")
        keep = local[pairs_position] >= 0
        rank = torch.full((n_latents, n), -1, dtype=torch.long, device="cpu")
        rank[pairs_latent[keep], local[pairs_position[keep]]] = pairs_rank[keep]
        rank = rank.to(device)
        r = rank[codes.indices, image[:, None]]  # (tokens, k): rank of this image for that latent
        hit = r >= 0
        spot = (codes.indices[hit] * top_n + r[hit]) * locations + location[:, None].expand_as(r)[hit]
        out.index_put_((spot.cpu(),), codes.values[hit].half().cpu())
    return out.view(n_latents, top_n, locations)


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
    return {
        "entropy": float(-(p * np.log2(p)).sum()),
        "majority": float(p.max()),
        "majority_label": str(values[p.argmax()]),
    }


def random_purity(labels: np.ndarray, n: int, *, draws: int = 500, seed: int = 0) -> dict[str, float]:
    """The purity statistics of n images drawn at random (= top-n under shuffled labels): mean and sd."""
    rng = np.random.default_rng(seed)
    stats = [purity(labels[rng.choice(len(labels), n, replace=False)]) for _ in range(draws)]
    return {
        f"{k}_{s}": float(getattr(np, s)([x[k] for x in stats]))
        for k in ("entropy", "majority")
        for s in ("mean", "std")
    }


def revelio_sigma(class_ids: np.ndarray) -> float:
    """Revelio's purity: the standard deviation of integer class ids (order-dependent; for comparison only)."""
    return float(np.std(class_ids))


def analyse_features(
    sae_dir: str | Path,
    *,
    store: str | Path | None = None,
    label_columns: Sequence[str] | None = None,
    top_n: int | None = None,
    seed: int | None = None,
    config: FeaturesConfig | None = None,
    masks: np.ndarray | None = None,
    attribution: AttributionConfig | None = None,
    caption_fn: Callable[[list[int]], list[str | None]] | None = None,
) -> tuple[dict[str, Any], ImageActivations, list[dict[str, Any]]]:
    """Per-latent frequency, top held-out images, purity vs the random baseline, AUROC per factor value
    (chosen on one half of the held-out images, reported on the other, with a null for the max), per
    location against object `masks` ((N, H, W) coverage per source image, optional; needs every held-out
    map, i.e. `config.max_map_values` large enough), and the caption words enriched among each latent's
    top images (the store rows' captions, or, when they have none, `caption_fn(source indices)`: e.g. a
    captioner run on the held-out images).

    Returns (results as plain data, the held-out activations, the held-out rows of the store index).
    """
    config = config or FeaturesConfig()
    attribution = attribution or AttributionConfig()
    if top_n is not None:
        config = replace(config, top_n=top_n)
    if seed is not None:
        config = replace(config, seed=seed)
    sae, info = load_sae(sae_dir, device=resolve_device(config.device))
    reader = open_store(store or info["slice"]["store"])
    train = info["train"]
    data = SliceData(reader, train["layer"], train["t"], train["tokens"], train["heldout_fraction"])
    check_d_in(Path(sae_dir), info, data.d_in)  # a clear error if the slice changed under it
    acts = image_activations(sae, data, config)
    row_index = reader.rows()
    held = [row_index[r] for r in acts.rows]
    columns = list(label_columns) if label_columns is not None else store_label_columns(held)
    labels = {
        c: np.array([str(r.get(c)) for r in held], dtype=object)
        for c in columns
        if not any(is_missing(r.get(c)) for r in held)
    }
    n = min(config.top_n, len(held))
    baselines = {c: random_purity(v, n, seed=config.seed) for c, v in labels.items() if n > 0}
    aurocs = {c: auroc_table(acts.values, v) for c, v in labels.items()}
    frequency = (acts.values > 0).mean(0)
    latents = []
    for j in range(sae.config.n_latents):
        order = acts.top[j, :n]
        order = order[acts.values[order, j] > 0]
        entry: dict[str, Any] = {
            "latent": j,
            "image_frequency": float(frequency[j]),
            "max_activation": float(acts.values[:, j].max()) if len(held) else 0.0,
            "top": [int(i) for i in order],
            "purity": {},
        }
        for c, v in labels.items():
            if len(order):
                classes = {name: k for k, name in enumerate(sorted(set(v)))}
                entry["purity"][c] = {
                    **purity(v[order]),
                    "revelio_sigma": revelio_sigma(np.array([classes[x] for x in v[order]])),
                    "n": len(order),
                }
        entry["auroc"] = {c: {value: float(a[j]) for value, a in table.items()} for c, table in aurocs.items()}
        latents.append(entry)
    best = {
        c: {value: {"latent": int(a.argmax()), "auroc": float(a.max())} for value, a in table.items()}
        for c, table in aurocs.items()
    }
    values_total = sum(len(v) for v in best.values())
    covered = sum(1 for v in best.values() for x in v.values() if x["auroc"] >= 0.95)
    source_index = [int(r.get("source_index", i)) for i, r in enumerate(held)]
    mask_index = [int(r.get("source_index", row)) for r, row in zip(held, acts.rows)]  # masks: per source image
    captions = [r.get("caption") for r in held]
    if caption_fn is not None and not any(isinstance(c, str) and c for c in captions):
        captions = list(caption_fn(mask_index))
        if len(captions) != len(held):
            raise ValueError(f"caption_fn returned {len(captions)} captions for {len(held)} held-out images")
    extra = _attribution(acts, labels, held, mask_index, masks, attribution, latents, captions)
    return (
        {
            "sae": str(sae_dir),
            "slice": info["slice"],
            "config": info["sae"],
            "metrics": info.get("metrics"),
            "inference": info.get("inference"),
            "heldout_images": len(held),
            "heldout_source_index": source_index,
            "top_n": n,
            "labels": list(labels),
            "baselines": baselines,
            # the old figure: max over latents on all held-out images (biased upwards; see heldout for the headline)
            "best_latent_per_value": best,
            "values_with_auroc_ge_0.95": covered,
            "values_total": values_total,
            **extra,
            "latents": latents,
        },
        acts,
        held,
    )


HELDOUT_RULE = (
    "the latent with the highest AUROC on half A of the held-out images (split by image), reported "
    "by its AUROC on half B; p from permuting half B's labels"
)


def _attribution(
    acts: ImageActivations,
    labels: dict[str, np.ndarray],
    held: list[dict[str, Any]],
    source_index: list[int],
    masks: np.ndarray | None,
    config: AttributionConfig,
    latents: list[dict[str, Any]],
    captions: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """The held-out best latents, per-location scores and localisation (with masks), and caption words."""
    out: dict[str, Any] = {"attribution": {**config.to_json(), "selection": HELDOUT_RULE}}
    halves = split_halves(len(held), config.split_seed)
    heldout = {
        c: best_latents(acts.values, v, halves, permutations=config.permutations, seed=config.split_seed)
        for c, v in labels.items()
    }
    out["heldout"] = {"best_latent_per_value": heldout, **coverage(heldout, config.auroc_target)}
    if masks is not None and acts.maps is not None and len(held):
        cells = grid_masks(np.asarray(masks)[source_index], acts.map_shape, config.mask_threshold)
        maps = acts.maps.astype(np.float32)
        per_location = {
            c: best_latents(maps, v, halves, cells=cells, permutations=config.permutations, seed=config.split_seed)
            for c, v in labels.items()
        }
        places = localisation(maps, cells)
        for entry in latents:
            entry["iou"] = float(places["iou"][entry["latent"]])
            entry["inside_share"] = float(places["inside_share"][entry["latent"]])
        out["per_location"] = {
            "best_latent_per_value": per_location,
            **coverage(per_location, config.auroc_target),
            "grid": list(acts.map_shape),
            "object_cells_mean": float(cells.sum((1, 2)).mean()),
        }
    elif masks is not None:
        out["per_location"] = {
            "skipped": "no per-location maps: a pooled SAE, or images x latents x locations above "
            "max_map_values (every held-out map is needed; raise it to score them)"
        }
    captions = [r.get("caption") for r in held] if captions is None else list(captions)
    if any(isinstance(c, str) and c for c in captions):
        words = word_enrichment(
            acts.values,
            [c if isinstance(c, str) else None for c in captions],
            top_n=config.word_top_n,
            fdr=config.fdr,
            max_words=config.max_words,
        )
        for entry, found in zip(latents, words["latents"]):
            entry["words"] = found
        out["words"] = {k: v for k, v in words.items() if k not in ("latents", "vocabulary")}
        out["words"]["vocabulary_size"] = len(words["vocabulary"])
        out["caption_labels"] = labels_named(heldout, words["latents"])
    return out
