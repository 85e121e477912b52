"""Small shared training utilities: an EMA of parameters, a progress-bar step loop."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from diffdissect.optim_state import lr_factor


class EMA:
    """Exponential moving average of a module's parameters (sampling uses the average)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: follow closely at first
        for avg, p in zip(self.shadow.parameters(), module.parameters()):
            avg.lerp_(p.detach(), 1 - decay)
        for avg_buffer, b in zip(self.shadow.buffers(), module.buffers()):
            avg_buffer.copy_(b)


def run_steps(
    steps: int, step_fn: Callable[[int], dict[str, float]], *, desc: str, progress: bool = True, log_every: int = 25
) -> list[dict[str, float]]:
    """Call `step_fn(step)` `steps` times with a progress bar showing its latest metrics."""
    history: list[dict[str, float]] = []
    with tqdm(total=steps, desc=desc, disable=not progress, unit="step") as bar:
        for step in range(steps):
            metrics = step_fn(step)
            history.append(metrics)
            if step % log_every == 0 or step == steps - 1:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
            bar.update(1)
    return history


def cosine_lr(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 100) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up, then a cosine down to 5% of the rate (`optim_state.lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup, floor=0.05))
