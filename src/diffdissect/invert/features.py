"""A classifier's feature maps at a layer, as (B, C, H, W) grids: what the inverter is conditioned on.

Any nn.Module and a module path: a forward hook keeps the layer's output. Conv maps are used as they
are; token sequences (B, N, D) become a grid when N is a square, or a square plus one (the CLS token,
first, is dropped). `pooled=True` averages the map over the grid and broadcasts it back: the pooled
baseline, which sees what is present but not where.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from diffdissect.errors import DiffdissectError, LayerNotFoundError


class FeatureError(DiffdissectError):
    """A feature map that the inverter cannot use (not spatial, or not the shape it was trained on)."""


def to_grid(output: Any, layer: str) -> torch.Tensor:
    """A layer's output -> (B, C, H, W)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise FeatureError(f"layer {layer!r} returns {type(output).__name__}, not a tensor.")
    if output.ndim == 4:
        return output
    if output.ndim == 3:
        n = output.shape[1]
        side = math.isqrt(n)
        if side * side == n:
            tokens = output
        elif math.isqrt(n - 1) ** 2 == n - 1:
            tokens, side = output[:, 1:], math.isqrt(n - 1)  # drop the CLS token
        else:
            raise FeatureError(
                f"layer {layer!r} gives {n} tokens, neither a square grid nor a grid plus a CLS "
                "token; pick a layer whose tokens cover the image in a square grid."
            )
        return tokens.transpose(1, 2).reshape(len(output), output.shape[2], side, side)
    raise FeatureError(
        f"layer {layer!r} outputs shape {tuple(output.shape)}: one vector per image, not a spatial map. "
        "Spatial inversion needs a (B, C, H, W) map or (B, N, D) tokens; pick an earlier layer, or "
        "train the pooled baseline (--mode pooled), which broadcasts a vector over the grid."
    )


class FeatureExtractor:
    """Run `model` on images in [-1, 1] and return the feature grid at `layer` (optionally pooled)."""

    def __init__(self, model: nn.Module, layer: str, *, mode: str = "spatial"):
        if mode not in ("spatial", "pooled"):
            raise FeatureError(f"mode must be spatial or pooled, not {mode!r}.")
        try:
            self.module = model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n][:30]
            raise LayerNotFoundError(f"the classifier has no module {layer!r}; modules: {names}") from None
        self.model, self.layer, self.mode = model.eval(), layer, mode

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        kept: list[Any] = []
        handle = self.module.register_forward_hook(lambda m, i, o: kept.append(o))
        try:
            self.model(images)
        finally:
            handle.remove()
        if self.mode == "pooled" and isinstance(kept[0], torch.Tensor) and kept[0].ndim == 2:
            return kept[0][:, :, None, None]  # a vector layer: a 1x1 "grid"
        grid = to_grid(kept[0], self.layer).float()
        return pool(grid) if self.mode == "pooled" else grid


def pool(grid: torch.Tensor) -> torch.Tensor:
    """The pooled baseline's condition: the mean feature vector broadcast over the same grid."""
    return grid.mean(dim=(2, 3), keepdim=True).expand_as(grid).contiguous()
