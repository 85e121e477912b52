"""One implementation per concept: the batched forward noising is diffusers' DDPM forward process bit for bit,
and what inverter training computed by hand before; the scalar form is capture's."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from diffdissect.models.noising import add_noise


def test_per_item_noising_is_ddpm_add_noise_bit_for_bit():
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = add_noise(scheduler, x0, noise, t)
    assert torch.equal(ours, scheduler.add_noise(x0, noise, t))  # diffusers' DDPM forward process
    a = scheduler.alphas_cumprod.float()[t][:, None, None, None]
    assert torch.equal(ours, a.sqrt() * x0 + (1 - a).sqrt() * noise)  # inverter training's old formula
    for i in range(len(t)):  # the scalar (capture) form agrees
        assert torch.allclose(
            add_noise(scheduler, x0[i : i + 1], noise[i : i + 1], int(t[i])), ours[i : i + 1], atol=1e-6
        )


def test_one_learning_rate_schedule_reproduces_the_three_it_replaced():
    import math

    from diffdissect.optim_state import lr_factor

    def sae_before(step, steps):  # sae/train.py
        warmup, decay_from = max(1, min(1000, steps // 20)), int(steps * 0.8)
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - decay_from)) if step >= decay_from else 1.0

    def toy_before(step, steps, warmup):  # toy/training.py's cosine_lr
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup)))) * 0.95 + 0.05

    def invert_before(step, steps, warmup):  # invert/train.py
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    for steps in (1, 7, 100, 3000):
        for step in range(steps):
            assert lr_factor(
                step, steps, max(1, min(1000, steps // 20)), decay="linear", decay_from=int(steps * 0.8)
            ) == sae_before(step, steps)
            assert lr_factor(step, steps, 100, floor=0.05) == toy_before(step, steps, 100)
            assert math.isclose(lr_factor(step, steps, 100), invert_before(step, steps, 100), abs_tol=1e-15)
