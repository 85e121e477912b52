"""Turning a captured module output into stored rows: pooling, token grids, finiteness checks."""

from __future__ import annotations

import math

import torch

from diffdissect.capture.spec import OutputOptions
from diffdissect.errors import NonFiniteActivationError, SpecError


def tokens_grid(n_tokens: int) -> tuple[int, int]:
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise SpecError(f"cannot reshape {n_tokens} tokens to a square grid; capture without --tokens-to-grid.")
    return side, side


def to_rows(output: torch.Tensor, opts: OutputOptions) -> torch.Tensor:
    """(B, C, H, W) | (B, N, D) | (B, D) -> stored rows in float32 (cast happens after the checks)."""
    x = output.float()
    if x.ndim == 3 and opts.tokens_to_grid:
        h, w = tokens_grid(x.shape[1])
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    if opts.pooling == "mean":
        if x.ndim == 3 and not opts.tokens_to_grid:  # tokens: average over the token axis
            return x.mean(dim=1)
        if x.ndim > 2:
            return x.mean(dim=tuple(range(2, x.ndim)))
    return x


def cast_checked(rows: torch.Tensor, dtype: torch.dtype, layer: str, t: int, input_ids: list[str]) -> torch.Tensor:
    """Cast to the stored dtype, refusing NaN/inf from the model and overflow from the cast."""
    bad = ~torch.isfinite(rows).reshape(rows.shape[0], -1).all(dim=1)
    if bad.any():
        which = [input_ids[i] for i in bad.nonzero().flatten().tolist()][:5]
        raise NonFiniteActivationError(
            f"layer {layer!r} at t={t} produced NaN/inf activations for inputs {which}. The model itself "
            "is numerically unstable here (try --model-dtype float32, or check the weights)."
        )
    cast = rows.to(dtype)
    overflow = ~torch.isfinite(cast).reshape(cast.shape[0], -1).all(dim=1)
    if overflow.any():
        peak = rows.abs().max().item()
        raise NonFiniteActivationError(
            f"layer {layer!r} at t={t} has values up to {peak:.4g}, beyond the {str(dtype).split('.')[-1]} "
            "range: they would be stored as inf. Capture with --dtype bfloat16 or float32."
        )
    return cast
