"""Optimiser state <-> named tensors, so checkpoints stay safetensors (no pickled optimiser dicts), and the one
learning-rate schedule every trainer uses."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn


def optimizer_tensors(
    optimiser: torch.optim.Optimizer, module: nn.Module, prefix: str = "adam"
) -> dict[str, torch.Tensor]:
    """`{prefix}.{parameter name}.{state key}` -> tensor, for every parameter with state."""
    names = {id(p): n for n, p in module.named_parameters()}
    out = {}
    for p, values in optimiser.state.items():
        for key, value in values.items():
            out[f"{prefix}.{names[id(p)]}.{key}"] = torch.as_tensor(value).clone()
    return out


def restore_optimizer(
    optimiser: torch.optim.Optimizer, module: nn.Module, state: dict[str, torch.Tensor], prefix: str = "adam"
) -> None:
    for name, p in module.named_parameters():
        # moments follow the parameter's device; 0-dim entries (Adam's step) stay on the CPU, where torch wants them
        entries = {
            k.rsplit(".", 1)[1]: (v.to(p.device) if v.dim() else v)
            for k, v in state.items()
            if k.startswith(f"{prefix}.{name}.")
        }
        if entries:
            optimiser.state[p] = entries


def lr_factor(
    step: int,
    steps: int,
    warmup: int,
    *,
    decay: Literal["cosine", "linear"] = "cosine",
    floor: float = 0.0,
    decay_from: int | None = None,
) -> float:
    """The learning-rate multiplier at `step` (0-based) of `steps`: a linear warm-up to 1 over `warmup` steps, then
    'cosine': half a cosine from 1 down to `floor` at the last step (inverters, the toy build);
    'linear': 1 until `decay_from`, then linear to 0 at `steps` (the SAEs, as in Gao et al.)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup)))) * (1 - floor) + floor
    start = steps if decay_from is None else decay_from
    if step >= start:
        return max(0.0, (steps - step) / max(1, steps - start))
    return 1.0
