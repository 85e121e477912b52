"""Cluster prompt latents (each prompt's mean latent over its seeds) and score against a known grouping.

Optionally nuisance families' directions are projected out first ("cluster by shape with colour and size
held out"): when the prompts also name colours, colour dominates h-space and clusters follow it instead.
Optionally each sample's map is mean-pooled over positions before the prompt mean, so a factor that moves
with the object's place (shape in the shapes world) is not blurred by averaging maps over seeds.
The adjusted Rand index gets a permutation null (grouping labels shuffled across prompts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import StandardScaler

from diffdissect.result import Result, omit_if_none


@dataclass(frozen=True)
class ClusterScore(Result):
    """The adjusted Rand index of clusters against a known grouping, with its permutation null."""

    ari: float
    p_value: float  # grouping labels permuted across prompts
    null_q95: float


@dataclass(frozen=True)
class ClusterFit(ClusterScore):
    """A clustering of the prompts (one cluster per prompt) and its score."""

    clusters: list[int] = field(default_factory=list)
    family: list[str] | None = omit_if_none()  # the families projected out first ("removed")


@dataclass(frozen=True)
class ClusterStep(Result):
    """Prompt clusters at one (layer, step): on the raw prompt latents, and with nuisance families removed."""

    k: int
    prompts: list[str]
    groups: list[str]
    pooling: str
    raw: ClusterFit
    removed: ClusterFit | None = omit_if_none()

    def fits(self) -> dict[str, ClusterFit]:
        """The clusterings made, by kind ("raw", and "removed" when nuisance directions were projected out)."""
        return {"raw": self.raw} | ({"removed": self.removed} if self.removed is not None else {})

    @classmethod
    def from_json(cls, data: dict) -> ClusterStep:
        removed = ClusterFit.from_json(data["removed"]) if "removed" in data else None
        return cls(
            k=data["k"],
            prompts=data["prompts"],
            groups=data["groups"],
            pooling=data["pooling"],
            raw=ClusterFit.from_json(data["raw"]),
            removed=removed,
        )


def prompt_means(latents: np.ndarray, prompt_index: np.ndarray, n_prompts: int) -> np.ndarray:
    """(P, D) mean latent per prompt."""
    h = np.asarray(latents, np.float64).reshape(len(latents), -1)
    sums = np.zeros((n_prompts, h.shape[1]))
    np.add.at(sums, prompt_index, h)
    counts = np.bincount(prompt_index, minlength=n_prompts)
    return sums / np.maximum(counts, 1)[:, None]


def spatial_mean(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(N, C*H*W) flattened maps of `shape` (C, H, W) -> (N, C) means over positions (linear, so a direction
    pooled the same way stays the direction of the pooled latents)."""
    flat = np.asarray(flat, np.float64)
    return flat.reshape(len(flat), shape[0], -1).mean(-1)


def project_out(latents: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Remove the span of `dirs` (K, D) from every row."""
    basis, _ = np.linalg.qr(np.asarray(dirs, np.float64).T)
    return latents - (latents @ basis) @ basis.T


def cluster_prompts(means: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means (10 restarts) on per-dimension standardised prompt latents."""
    z = StandardScaler().fit_transform(means)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)


def ari_with_null(groups: list[str], clusters: np.ndarray, permutations: int = 1000, seed: int = 0) -> ClusterScore:
    ari = adjusted_rand_score(groups, clusters)
    rng = np.random.default_rng(seed)
    labels = np.asarray(groups)
    null = np.array([adjusted_rand_score(rng.permutation(labels), clusters) for _ in range(permutations)])
    return ClusterScore(
        ari=float(ari),
        p_value=float((1 + np.sum(null >= ari - 1e-12)) / (1 + permutations)),
        null_q95=float(np.quantile(null, 0.95)),
    )
