"""Optimiser state <-> named tensors, so checkpoints stay safetensors (no pickled optimiser dicts)."""
from __future__ import annotations

import torch
from torch import nn


def optimizer_tensors(optimiser: torch.optim.Optimizer, module: nn.Module, prefix: str = "adam") -> dict[str, torch.Tensor]:
    """`{prefix}.{parameter name}.{state key}` -> tensor, for every parameter with state."""
    names = {id(p): n for n, p in module.named_parameters()}
    out = {}
    for p, values in optimiser.state.items():
        for key, value in values.items():
            out[f"{prefix}.{names[id(p)]}.{key}"] = torch.as_tensor(value).clone()
    return out


def restore_optimizer(optimiser: torch.optim.Optimizer, module: nn.Module, state: dict[str, torch.Tensor],
                      prefix: str = "adam") -> None:
    for name, p in module.named_parameters():
        # moments follow the parameter's device; 0-dim entries (Adam's step) stay on the CPU, where torch wants them
        entries = {k.rsplit(".", 1)[1]: (v.to(p.device) if v.dim() else v) for k, v in state.items()
                   if k.startswith(f"{prefix}.{name}.")}
        if entries:
            optimiser.state[p] = entries
