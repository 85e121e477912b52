"""Reconstructions: sample the frozen pipeline with the inverter's residuals, guided on the features.

Classifier-free guidance contrasts the real feature map with the all-zero map (the condition dropped
in training): out = out(0) + s * (out(f) - out(0)), where out is the denoiser's noise, v or x0
prediction. Several seeds per input show the posterior's spread: what the features leave open.
Noise for (input i, seed s) comes from its own generator, so results do not depend on the batch layout.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from diffdissect.data.transforms import pixels_to_uint8
from diffdissect.errors import DiffdissectError
from diffdissect.invert.model import Inverter, controlled_prediction
from diffdissect.models.target import Target


@torch.no_grad()
def invert(
    target: Target,
    inverter: Inverter,
    features: torch.Tensor,
    *,
    seeds: tuple[int, ...] = (0,),
    guidance: float = 3.0,
    steps: int = 20,
    batch: int = 128,
    ids: list[int] | None = None,
) -> np.ndarray:
    """(N, S, H, W, 3) uint8: S = len(seeds) reconstructions of each of the N feature maps."""
    inverter.check_features(features)
    if target.vae is None:
        raise DiffdissectError(f"{target.source} has no VAE; inversion needs the latent pipeline it was trained on.")
    if len(features) == 0:
        return np.zeros((0, len(seeds), target.resolution, target.resolution, 3), np.uint8)
    inverter.eval().to(target.device)
    ids = list(range(len(features))) if ids is None else ids
    jobs = [(i, s) for i in range(len(features)) for s in seeds]
    out = []
    for start in range(0, len(jobs), batch):
        part = jobs[start : start + batch]
        feats = features[[i for i, _ in part]].float()
        noise = torch.stack(
            [
                torch.randn(
                    target_latent_shape(target),
                    device="cpu",
                    generator=torch.Generator(device="cpu").manual_seed(int(s) * 1_000_003 + int(ids[i])),
                )
                for i, s in part
            ]
        )
        out.append(_sample_batch(target, inverter, feats.to(target.device), noise.to(target.device), guidance, steps))
    images = np.concatenate(out)
    return images.reshape(len(features), len(seeds), *images.shape[1:])


def target_latent_shape(target: Target) -> tuple[int, int, int]:
    cfg = target.denoiser.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size, cfg.sample_size)
    return (cfg.in_channels, *size)


def _sample_batch(
    target: Target, inverter: Inverter, feats: torch.Tensor, noise: torch.Tensor, guidance: float, steps: int
) -> np.ndarray:
    scheduler = copy.deepcopy(target.scheduler)
    scheduler.set_timesteps(steps)
    unet = target.denoiser
    n = len(feats)
    text = target.text_embeddings([""]).expand(2 * n if guidance != 1.0 else n, -1, -1)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        tt = torch.full((len(text),), int(t), device=latents.device)
        if guidance == 1.0:
            pred = controlled_prediction(unet, inverter, x, tt, text, feats)  # noise, v or x0: the scheduler knows
        else:
            both = controlled_prediction(
                unet, inverter, torch.cat([x, x]), tt, text, torch.cat([torch.zeros_like(feats), feats])
            )
            uncond, cond = both.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
    return decode(target, latents)


@torch.no_grad()
def decode(target: Target, latents: torch.Tensor) -> np.ndarray:
    return pixels_to_uint8(target.decode_latents(latents))
