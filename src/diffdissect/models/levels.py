"""One model of noise levels for both forward processes, DDPM (alpha_bar) and flow matching (sigma).

Users name a level by its training index t in [0, N), larger = noisier, for every family:

* DDPM family: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, alpha_bar_t from the training
  schedule's `alphas_cumprod`; the denoiser is handed t itself.
* Flow matching (SD3, FLUX, Sana): x_t = (1 - sigma) x0 + sigma eps. The training grid is the one
  diffusers' FlowMatchEulerDiscreteScheduler builds at init, sigma_base(t) = (t + 1) / N, shifted by the
  scheduler's `shift` (or `flow_shift`): sigma = s sigma_base / (1 + (s - 1) sigma_base); models with
  dynamic shifting (FLUX) use the resolution-dependent mu of diffusers' `calculate_shift` instead:
  sigma = e^mu / (e^mu + 1 / sigma_base - 1). The denoiser is handed sigma * N times the family's
  scale (FLUX: / 1000; Sana: `timestep_scale`), truncated to an integer where the scheduler's own
  timesteps are integers (DPMSolver with flow sigmas), exactly as its pipeline does.

Every stored level records t, the exact value handed to the denoiser, the process, alpha_bar or sigma,
signal scale, noise std, log-SNR and the shift, so stores of different families compare on one axis.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from diffdissect.errors import SpecError

Process = Literal["ddpm", "flow"]

# What a scheduler *is* decides the forward process, never whether it happens to have an attribute:
# Sana's DPMSolverMultistepScheduler(use_flow_sigmas=True) has an alphas_cumprod, and it is meaningless.
DDPM_SCHEDULERS = frozenset(
    {
        "DDPMScheduler",
        "DDIMScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "DPMSolverSDEScheduler",
        "DPMSolverMultistepInverseScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "LCMScheduler",
        "TCDScheduler",
        "DDIMParallelScheduler",
        "DDPMParallelScheduler",
        "SASolverScheduler",
        "DDIMInverseScheduler",
        "DDPMWuerstchenScheduler",
    }
)
FLOW_SCHEDULERS = frozenset(
    {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler"}
)


def process_of(scheduler: Any) -> Process:
    """'flow' or 'ddpm' from what the scheduler is (its class and configuration); anything else is refused."""
    names = {cls.__name__ for cls in type(scheduler).__mro__}
    config = getattr(scheduler, "config", {}) or {}
    if names & FLOW_SCHEDULERS or config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        return "flow"
    if names & DDPM_SCHEDULERS:
        return "ddpm"
    raise SpecError(
        f"{type(scheduler).__name__} is neither a DDPM-family scheduler ({', '.join(sorted(DDPM_SCHEDULERS)[:4])}, "
        f"...) nor a flow-matching one ({', '.join(sorted(FLOW_SCHEDULERS))}); diffdissect cannot tell "
        "which forward process the model was trained on. Give the model one of those schedulers."
    )


@dataclass(frozen=True)
class NoiseLevel:
    """One noise level: x_t = signal_scale * x0 + noise_std * eps, and what the denoiser is handed."""

    t: int  # training index in [0, N), larger = noisier
    denoiser_t: float  # the exact timestep value handed to the denoiser
    process: Process
    alpha_bar: float | None  # DDPM family
    sigma: float | None  # flow matching
    signal_scale: float
    noise_std: float
    log_snr: float  # log(signal_scale^2 / noise_std^2)
    shift: float | None = None  # flow: the static shift (None with a dynamic mu)
    mu: float | None = None  # flow: FLUX's resolution-dependent shift

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t from x0 and the noise (on x0's device and dtype)."""
        return self.signal_scale * x0 + self.noise_std * noise.to(x0.device, x0.dtype)


def _log_snr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 2.0 * (math.log(signal) - math.log(noise))


def alphas_cumprod(scheduler: Any) -> Any:
    """The training schedule's alpha_bar_t table (DDPM-family schedulers only)."""
    if process_of(scheduler) != "ddpm":
        raise SpecError(
            f"{type(scheduler).__name__} is a flow-matching scheduler: it has no alpha_bar schedule. "
            "This step supports DDPM-family models only (SD 1.x/2.x, SDXL, PixArt, DiT)."
        )
    return scheduler.alphas_cumprod


@dataclass(frozen=True)
class FlowSchedule:
    """The training-time sigma grid of a flow-matching model (see the module docstring)."""

    n: int
    shift: float | None  # static shift; None when mu is used
    mu: float | None
    time_shift: str = "exponential"
    scale: float = 1.0  # denoiser argument = sigma * n * scale
    integer: bool = False  # the scheduler's timesteps are integers (DPMSolver with flow sigmas)

    def shifted(self, base: float) -> float:
        if self.mu is not None:
            if self.time_shift == "linear":
                return self.mu / (self.mu + (1.0 / base - 1.0))
            return math.exp(self.mu) / (math.exp(self.mu) + (1.0 / base - 1.0))
        s = 1.0 if self.shift is None else self.shift
        return s * base / (1.0 + (s - 1.0) * base)

    def unshifted(self, sigma: float) -> float:
        if sigma >= 1.0:
            return 1.0
        if self.mu is not None:
            m = self.mu if self.time_shift == "linear" else math.exp(self.mu)
            return 1.0 / (m / sigma - m + 1.0)
        s = 1.0 if self.shift is None else self.shift
        return sigma / (s - (s - 1.0) * sigma)

    def sigma(self, t: int) -> float:
        return self.shifted((t + 1) / self.n)

    def index_of(self, sigma: float) -> int:
        """The training index whose grid sigma is nearest `sigma` (exact for sigmas on the grid)."""
        return min(self.n - 1, max(0, round(self.unshifted(sigma) * self.n) - 1))

    def denoiser_t(self, sigma: float) -> float:
        value = sigma * self.n
        if self.integer:
            value = float(math.floor(value))  # the int64 cast of DPMSolver's timesteps
        return value * self.scale

    def level(self, t: int, sigma: float | None = None, denoiser_t: float | None = None) -> NoiseLevel:
        sigma = self.sigma(t) if sigma is None else sigma
        return NoiseLevel(
            t=t,
            denoiser_t=self.denoiser_t(sigma) if denoiser_t is None else denoiser_t,
            process="flow",
            alpha_bar=None,
            sigma=sigma,
            signal_scale=1.0 - sigma,
            noise_std=sigma,
            log_snr=_log_snr(1.0 - sigma, sigma),
            shift=self.shift if self.mu is None else None,
            mu=self.mu,
        )


def flow_schedule(scheduler: Any, *, mu: float | None = None, scale: float = 1.0) -> FlowSchedule:
    """The flow grid of `scheduler`; `mu` is the dynamic shift of models that use one (else ignored)."""
    config = scheduler.config
    n = int(config.num_train_timesteps)
    names = {cls.__name__ for cls in type(scheduler).__mro__}
    dynamic = bool(config.get("use_dynamic_shifting", False))
    if dynamic and mu is None:
        raise SpecError(
            f"{type(scheduler).__name__} uses dynamic shifting, but no image sequence length is known "
            "to compute its mu; load the model through its pipeline."
        )
    shift = float(config.get("shift", config.get("flow_shift", 1.0)) or 1.0)
    return FlowSchedule(
        n=n,
        shift=None if dynamic else shift,
        mu=mu if dynamic else None,
        time_shift=str(config.get("time_shift_type", "exponential")),
        scale=scale,
        integer=not (names & FLOW_SCHEDULERS),
    )


def ddpm_level(scheduler: Any, t: int) -> NoiseLevel:
    a = float(alphas_cumprod(scheduler)[int(t)])
    signal, noise = a**0.5, (1.0 - a) ** 0.5
    return NoiseLevel(
        t=int(t),
        denoiser_t=float(t),
        process="ddpm",
        alpha_bar=a,
        sigma=None,
        signal_scale=signal,
        noise_std=noise,
        log_snr=_log_snr(signal, noise),
    )


def check_timesteps(timesteps: list[int], n: int) -> None:
    for t in timesteps:
        if not isinstance(t, int) or isinstance(t, bool):
            raise SpecError(f"timestep {t!r} is not an integer; timesteps are training indices in [0, {n}).")
        if not 0 <= t < n:
            raise SpecError(
                f"timestep t={t} is out of range: timesteps are training-schedule indices in "
                f"[0, {n}), larger = noisier (t=0 is almost clean, t={n - 1} pure noise)."
            )
    if len(set(timesteps)) != len(timesteps):
        raise SpecError(f"timesteps are listed more than once: {timesteps}")


def levels_for(
    scheduler: Any, timesteps: list[int] | None, sigmas: list[float] | None = None, *, flow: FlowSchedule | None = None
) -> list[NoiseLevel]:
    """Levels at training indices `timesteps`, or (flow models) at `sigmas` given directly."""
    n = int(scheduler.config.num_train_timesteps)
    process = process_of(scheduler)
    if sigmas:
        if process != "flow":
            raise SpecError(
                f"--sigmas names flow-matching noise levels, but {type(scheduler).__name__} is a "
                "DDPM-family scheduler; name its levels with --timesteps."
            )
        assert flow is not None
        bad = [s for s in sigmas if not (isinstance(s, (int, float)) and 0.0 < s <= 1.0)]
        if bad:
            raise SpecError(
                f"sigma {bad[0]!r} is outside (0, 1]: flow-matching noise levels run from 0 (clean, "
                "excluded) to 1 (pure noise)."
            )
        levels = [flow.level(flow.index_of(float(s)), sigma=float(s)) for s in sigmas]
        seen = [lv.t for lv in levels]
        if len(set(seen)) != len(seen):
            raise SpecError(
                f"sigmas {sigmas} fall on the same training index more than once ({seen}); the store "
                "keys slices by training index, so give sigmas at least 1/N apart."
            )
        return levels
    check_timesteps(list(timesteps or []), n)
    if process == "flow":
        assert flow is not None
        return [flow.level(t) for t in timesteps or []]
    return [ddpm_level(scheduler, t) for t in timesteps or []]
