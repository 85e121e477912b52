"""Timesteps and noise. t is a training-schedule index in [0, num_train_timesteps), larger = noisier.

(`scheduler.timesteps` after `set_timesteps` runs from noisy to clean, i.e. descending; diffdissect
never indexes into it, it takes t as the training index and records alpha_bar_t beside it.)
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from diffdissect.errors import SpecError
from diffdissect.models.levels import alphas_cumprod as _alphas_cumprod
from diffdissect.models.levels import check_timesteps, ddpm_level


def alphas_cumprod(scheduler: Any) -> Any:
    """The training schedule's alpha_bar_t table (DDPM-family schedulers only; models.levels asks what the
    scheduler is, so a flow-matching one is refused even when it has an alphas_cumprod attribute)."""
    return _alphas_cumprod(scheduler)


def timestep_table(scheduler: Any, timesteps: list[int]) -> list[dict[str, Any]]:
    """For each training index t of a DDPM-family scheduler: its full noise level (models.levels.NoiseLevel):
    alpha_bar_t, signal scale sqrt(alpha_bar_t), noise std sqrt(1 - alpha_bar_t), log-SNR, the denoiser's t."""
    alphas_cumprod(scheduler)
    check_timesteps(list(timesteps), int(scheduler.config.num_train_timesteps))
    return [ddpm_level(scheduler, t).to_json() for t in timesteps]


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


def add_noise(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise: the forward process the denoiser was trained on.

    `t` is one training index for the whole batch (capture: alpha_bar in float64, then the product in x0's
    dtype), or a tensor with one index per batch item (training: alpha_bar in x0's dtype, as diffusers'
    `DDPMScheduler.add_noise` computes it, bit for bit).

    Computed from the training schedule's alphas_cumprod, never through `scheduler.add_noise`: sampling
    schedulers (DPMSolver, Euler, UniPC, ...) index their sigmas by position in the *inference* schedule,
    which runs from noisy to clean, so their add_noise at a training index t noises at the wrong level
    (t=1 comes out almost pure noise), and Euler-style ones return the unscaled x0 + sigma * noise.
    """
    if isinstance(t, torch.Tensor) and t.ndim > 0:
        table = torch.as_tensor(alphas_cumprod(scheduler), device=x0.device).to(x0.dtype)[t.to(x0.device)]
        table = table.reshape(-1, *[1] * (x0.ndim - 1))
        return table**0.5 * x0 + (1 - table) ** 0.5 * noise.to(x0.device, x0.dtype)
    alpha_bar = float(alphas_cumprod(scheduler)[int(t)])
    noise = noise.to(x0.device, x0.dtype)
    return alpha_bar**0.5 * x0 + (1.0 - alpha_bar) ** 0.5 * noise


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler: Any) -> str:
    """The scheduler's `prediction_type` (epsilon when it names none), refused unless diffdissect can train it."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise SpecError(
            f"the scheduler's prediction_type {kind!r} is not supported; diffdissect trains denoisers "
            f"for {', '.join(PREDICTION_TYPES)}."
        )
    return kind


def denoiser_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a denoiser trained under `scheduler.config.prediction_type` outputs for x_t made from (x0, noise, t).

    epsilon: the noise; v_prediction: sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0 (SD 2.x); sample: x0.
    `t` holds one training index per batch item.
    """
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    alpha_bar = _alpha_bar_per_item(scheduler, t).to(x0.device, x0.dtype)  # v_prediction
    alpha_bar = alpha_bar.reshape(-1, *([1] * (x0.dim() - 1)))
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def x0_error_weights(scheduler: Any, t: torch.Tensor, x0_weight: float) -> torch.Tensor:
    """Per-sample weights that make the denoiser's MSE cost `SNR_t + x0_weight` per unit of x0 error.

    Whatever the output type, an error in the implied x0 costs SNR (epsilon loss), SNR + 1 (v loss) or
    1 (x0 loss) per unit, SNR = alpha_bar / (1 - alpha_bar). `x0_weight` moves between them: 0 weighs
    time steps as the epsilon loss does, 1 as the v loss. The weights multiply the MSE of the
    scheduler's own `prediction_type`, so one loss serves every output parameterisation.
    """
    if not x0_weight >= 0:
        raise SpecError(f"x0_weight must be >= 0 (0: the epsilon loss's weighting, 1: the v loss's); got {x0_weight}")
    alpha_bar = _alpha_bar_per_item(scheduler, t)
    snr = alpha_bar / (1 - alpha_bar)
    natural = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[prediction_type(scheduler)]
    return ((snr + x0_weight) / natural).float().to(t.device)


def _alpha_bar_per_item(scheduler: Any, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at each batch item's training index `t`, float64 on the CPU."""
    return torch.as_tensor(alphas_cumprod(scheduler), dtype=torch.float64)[t.cpu()]
