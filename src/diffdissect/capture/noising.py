"""Timesteps and noise. t is a training-schedule index in [0, num_train_timesteps), larger = noisier.

(`scheduler.timesteps` after `set_timesteps` runs from noisy to clean, i.e. descending; diffdissect
never indexes into it, it takes t as the training index and records alpha_bar_t beside it.)
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from diffdissect.errors import SpecError
from diffdissect.models.target import Target


def alphas_cumprod(scheduler: Any) -> Any:
    """The training schedule's alpha_bar_t table (DDPM-family schedulers only)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise SpecError(f"{type(scheduler).__name__} has no alphas_cumprod (e.g. a flow-matching scheduler); "
                        "diffdissect needs a DDPM-family scheduler to noise images at a training timestep.")
    return alphas


def timestep_table(scheduler: Any, timesteps: list[int]) -> list[dict[str, float]]:
    """For each t: alpha_bar_t, signal scale sqrt(alpha_bar_t), noise std sqrt(1 - alpha_bar_t)."""
    alphas = alphas_cumprod(scheduler)
    n = len(alphas)
    table = []
    for t in timesteps:
        if not isinstance(t, int) or isinstance(t, bool):
            raise SpecError(f"timestep {t!r} is not an integer; timesteps are training indices in [0, {n}).")
        if not 0 <= t < n:
            raise SpecError(f"timestep t={t} is out of range: timesteps are training-schedule indices in "
                            f"[0, {n}), larger = noisier (t=0 is almost clean, t={n - 1} pure noise).")
        a = float(alphas[t])
        table.append({"t": t, "alpha_bar": a, "signal_scale": a ** 0.5, "noise_std": (1.0 - a) ** 0.5})
    if len(set(timesteps)) != len(timesteps):
        raise SpecError(f"timesteps are listed more than once: {timesteps}")
    return table


def noise_seed(input_id: str, seed: int) -> int:
    """A 63-bit generator seed for one (input, seed) pair: independent of batch layout and device."""
    digest = hashlib.sha256(f"{seed}\x00{input_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noise_for(input_ids: list[str], seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian noise, one draw per input, generated on the CPU so every device sees the same numbers.

    The same (input, seed) noise is used at every t: the ensemble member `seed` is one noise
    direction, scaled by the schedule.
    """
    out = torch.empty((len(input_ids), *shape))
    for i, input_id in enumerate(input_ids):
        gen = torch.Generator().manual_seed(noise_seed(input_id, seed))
        out[i] = torch.randn(shape, generator=gen)
    return out


def add_noise(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise: the forward process the denoiser was trained on.

    Computed from the training schedule's alphas_cumprod, never through `scheduler.add_noise`: sampling
    schedulers (DPMSolver, Euler, UniPC, ...) index their sigmas by position in the *inference* schedule,
    which runs from noisy to clean, so their add_noise at a training index t noises at the wrong level
    (t=1 comes out almost pure noise), and Euler-style ones return the unscaled x0 + sigma * noise.
    """
    alpha_bar = float(alphas_cumprod(scheduler)[int(t)])
    noise = noise.to(x0.device, x0.dtype)
    return alpha_bar ** 0.5 * x0 + (1.0 - alpha_bar) ** 0.5 * noise


def dry_inputs(target: Target, t: int | None = None, batch: int = 1):
    """A zero sample, a timestep and default conditioning: enough for a shape-probing forward."""
    c, h, w = target.sample_shape()
    sample = torch.zeros(batch, c, h, w, device=target.device, dtype=target.dtype)
    t = target.num_train_timesteps // 2 if t is None else t
    timestep = torch.full((batch,), t, device=target.device, dtype=torch.long)
    return sample, timestep, target.conditioning(None, None, batch)
