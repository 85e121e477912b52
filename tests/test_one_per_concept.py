"""One implementation per concept: the batched forward noising is diffusers' DDPM forward process bit for bit,
and what inverter training computed by hand before; the scalar form is capture's."""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from diffdissect.models.noising import add_noise


def test_per_item_noising_is_ddpm_add_noise_bit_for_bit():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = add_noise(scheduler, x0, noise, t)
    assert torch.equal(ours, scheduler.add_noise(x0, noise, t))                  # diffusers' DDPM forward process
    a = scheduler.alphas_cumprod.float()[t][:, None, None, None]
    assert torch.equal(ours, a.sqrt() * x0 + (1 - a).sqrt() * noise)             # inverter training's old formula
    for i in range(len(t)):                                                      # the scalar (capture) form agrees
        assert torch.allclose(add_noise(scheduler, x0[i:i + 1], noise[i:i + 1], int(t[i])), ours[i:i + 1],
                              atol=1e-6)
