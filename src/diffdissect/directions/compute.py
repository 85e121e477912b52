"""Directions in latent space for every term at once, without training a vector per concept.

Both estimators take latents H (N x D; a step's h-space, flattened) and term indicators X (N x V) and
return one direction per term (V x D) from a few matrix products:
  * mean difference: mean(h | term) - mean(h | no term);
  * ridge: the coefficients of h regressed on all indicators together (centred), so each term's
    direction is its effect with the other terms held fixed (co-occurring words are disentangled).
Rows with `valid` False (no caption) are left out.
"""

from __future__ import annotations

import numpy as np
import torch

METHODS = ("mean_difference", "ridge")


def _as_tensors(latents, indicators, valid):
    h = torch.as_tensor(np.asarray(latents), dtype=torch.float64).flatten(1)
    x = torch.as_tensor(np.asarray(indicators), dtype=torch.float64)
    if valid is not None:
        keep = torch.as_tensor(np.asarray(valid, bool))
        h, x = h[keep], x[keep]
    return h, x


def mean_difference_directions(latents, indicators, valid=None) -> np.ndarray:
    """(V, D): mean latent of samples with the term minus mean latent of samples without it."""
    h, x = _as_tensors(latents, indicators, valid)
    n_with = x.sum(0)  # (V,)
    n_without = x.shape[0] - n_with
    sums_with = x.T @ h  # (V, D)
    total = h.sum(0, keepdim=True)
    with_mean = sums_with / n_with.clamp_min(1)[:, None]
    without_mean = (total - sums_with) / n_without.clamp_min(1)[:, None]
    out = with_mean - without_mean
    out[(n_with == 0) | (n_without == 0)] = float("nan")
    return out.float().numpy()


def ridge_directions(latents, indicators, valid=None, alpha: float = 1.0) -> np.ndarray:
    """(V, D): ridge coefficients of centred h on centred indicators, solved for all D outputs at once."""
    h, x = _as_tensors(latents, indicators, valid)
    xc = x - x.mean(0, keepdim=True)
    hc = h - h.mean(0, keepdim=True)
    gram = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=x.dtype)
    return np.ascontiguousarray(torch.linalg.solve(gram, xc.T @ hc).float().numpy())


def directions(latents, indicators, method: str = "mean_difference", valid=None, alpha: float = 1.0) -> np.ndarray:
    if method == "mean_difference":
        return mean_difference_directions(latents, indicators, valid)
    if method == "ridge":
        return ridge_directions(latents, indicators, valid, alpha)
    raise ValueError(f"unknown direction method {method!r}; choose one of {METHODS}.")


def cosine_to_directions(latents, dirs: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(N, K): cosine between each centred latent and each direction."""
    h = np.asarray(latents, np.float64).reshape(len(latents), -1) - centre.reshape(1, -1)
    d = np.asarray(dirs, np.float64)
    h /= np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    return h @ d.T
