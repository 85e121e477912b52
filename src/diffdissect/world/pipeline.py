"""The shapes world's tiny text-to-image pipeline: a miniature Stable Diffusion in stock diffusers format.

AutoencoderKL (32 px -> 4x8x8 latents) + UNet2DConditionModel with cross-attention + CLIPTextModel and
CLIPTokenizer over the world's vocabulary. Saved with `save_pretrained`; loads with stock
`diffusers.DiffusionPipeline.from_pretrained(path)` and no custom code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

from diffdissect.data.transforms import uint8_to_pixels
from diffdissect.models.noising import add_noise, denoiser_target, x0_error_weights
from diffdissect.models.text import build_clip_text_encoder, build_clip_tokenizer
from diffdissect.runtime import seeded
from diffdissect.world.generator import WorldConfig, captions_for, sample_world
from diffdissect.world.training import EMA, cosine_lr, run_steps


@dataclass
class PipelineConfig:
    """Sizes and schedule of the toy pipeline build (the source of truth for the committed weights)."""

    seed: int = 0
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_channels: tuple[int, ...] = (32, 64)
    text_dim: int = 64
    text_layers: int = 2
    max_tokens: int = 12
    unet_steps: int = 4000
    unet_batch: int = 128
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    latent_pool: int = 40000  # world images encoded once for UNet training
    prediction_type: str = "v_prediction"  # as SD 2.x; the output at high noise is the layout (docs/toy-world.md)
    x0_weight: float = 0.1  # loss per unit x0 error = SNR + x0_weight (0: epsilon's weighting, 1: v's)
    threads: int | None = None

    def scaled(self, factor: float) -> PipelineConfig:
        """The same recipe with step counts multiplied by `factor` (smoke builds use tiny factors)."""
        out = PipelineConfig(**asdict(self))
        out.vae_steps = max(2, int(self.vae_steps * factor))
        out.unet_steps = max(2, int(self.unet_steps * factor))
        out.latent_pool = max(out.unet_batch, int(self.latent_pool * factor))
        return out


def sd_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """Stable Diffusion's noise schedule (scaled_linear betas, 1000 training steps) and prediction target."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        prediction_type=prediction_type,
    )


def check_caption_length(tokenizer, world: WorldConfig, max_tokens: int) -> None:
    """Refuse a token budget that would truncate the world's longest caption (every factor named)."""
    longest = {
        f: np.array([max(range(len(world.values(f))), key=lambda i: len(world.values(f)[i]))])
        for f in ("shape", "colour", "size", "xpos", "ypos")
    }
    caption = captions_for(world, longest, {k: np.ones(1, bool) for k in world.keep})[0]
    needed = len(tokenizer(caption).input_ids)
    if needed > max_tokens:
        raise ValueError(
            f"max_tokens={max_tokens} truncates the caption {caption!r} ({needed} tokens with "
            f"start and end); set the recipe's max_tokens to at least {needed}"
        )


def build_untrained(recipe: PipelineConfig, world: WorldConfig) -> diffusers.StableDiffusionPipeline:
    tokenizer = build_clip_tokenizer(world.vocabulary(), recipe.max_tokens)
    check_caption_length(tokenizer, world, recipe.max_tokens)
    with seeded(recipe.seed):
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(recipe.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(recipe.vae_channels),
            block_out_channels=recipe.vae_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=world.image_size,
        )
        text_encoder = build_clip_text_encoder(tokenizer, recipe.text_dim, recipe.text_layers, heads=4)
        latent = world.image_size // 2 ** (len(recipe.vae_channels) - 1)
        unet = diffusers.UNet2DConditionModel(
            sample_size=latent,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=recipe.unet_channels,
            down_block_types=("CrossAttnDownBlock2D",) * len(recipe.unet_channels),
            up_block_types=("CrossAttnUpBlock2D",) * len(recipe.unet_channels),
            cross_attention_dim=recipe.text_dim,
            attention_head_dim=4,
            norm_num_groups=16,
        )
    scheduler = diffusers.DPMSolverMultistepScheduler(**sd_scheduler_config(recipe.prediction_type))
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return uint8_to_pixels(images)


def train_vae(vae: diffusers.AutoencoderKL, recipe: PipelineConfig, world: WorldConfig, *, progress: bool = True):
    """Reconstruction (L1 + MSE) + a tiny KL, on fresh world images every step."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = cosine_lr(opt, recipe.vae_steps)

    def step(i: int) -> dict[str, float]:
        x = to_pixels(sample_world(recipe.vae_batch, seed=10_000_000 + recipe.seed * 100_000 + i, config=world).images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + recipe.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"rec": rec.item()}

    with seeded(recipe.seed + 1):
        history = run_steps(recipe.vae_steps, step, desc="vae", progress=progress)
    vae.eval().requires_grad_(False)
    return history


@torch.no_grad()
def encode_pool(vae: diffusers.AutoencoderKL, recipe: PipelineConfig, world: WorldConfig):
    """Encode a pool of world images once: latent means, their factors; sets the VAE's scaling_factor."""
    batch = sample_world(recipe.latent_pool, seed=20_000_000 + recipe.seed, config=world)
    latents = torch.cat(
        [vae.encode(to_pixels(batch.images[i : i + 512])).latent_dist.mean for i in range(0, len(batch), 512)]
    )
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return latents * scaling, batch


def train_unet(
    pipe: diffusers.StableDiffusionPipeline,
    latents: torch.Tensor,
    factors: dict[str, np.ndarray],
    recipe: PipelineConfig,
    world: WorldConfig,
    *,
    progress: bool = True,
):
    """The recipe's prediction target (v by default) on SD's schedule, each sample's error weighted so that
    the implied x0 error costs SNR_t + x0_weight (docs/toy-world.md); UNet and text encoder trained
    jointly; EMA weights kept.

    Captions are re-drawn every step from each pooled image's factors (fresh omissions), and a
    fraction `cond_dropout` of captions is emptied for classifier-free guidance.
    """
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_schedule = diffusers.DDPMScheduler(**sd_scheduler_config(recipe.prediction_type))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    unet.train(), text_encoder.train()
    unet.set_attn_processor(AttnProcessor())  # at head dims of 8-16 on CPU, ~15% faster than SDPA's kernel
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.01)
    sched = cosine_lr(opt, recipe.unet_steps, warmup=200)
    ema_unet, ema_text = EMA(unet, recipe.ema_decay), EMA(text_encoder, recipe.ema_decay)
    rng = np.random.default_rng(30_000_000 + recipe.seed)
    n = len(latents)

    def step(i: int) -> dict[str, float]:
        idx = rng.integers(0, n, recipe.unet_batch)
        batch_factors = {k: v[idx] for k, v in factors.items()}
        kept = {k: rng.random(len(idx)) < p for k, p in world.keep.items()}
        captions = captions_for(world, batch_factors, kept)
        captions = ["" if drop else c for c, drop in zip(captions, rng.random(len(idx)) < recipe.cond_dropout)]
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        x0 = latents[torch.from_numpy(idx)]
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(idx),))
        x_t = add_noise(noise_schedule, x0, noise, t)
        pred = unet(x_t, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        per_sample = (pred - denoiser_target(noise_schedule, x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        loss = (x0_error_weights(noise_schedule, t, recipe.x0_weight) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.update(unet, i)
        ema_text.update(text_encoder, i)
        return {"loss": loss.item()}

    with seeded(recipe.seed + 2):
        history = run_steps(recipe.unet_steps, step, desc="unet", progress=progress)
    ema_unet.shadow.set_default_attn_processor()  # type: ignore[operator]  # a diffusers method, not a tensor
    pipe.unet, pipe.text_encoder = ema_unet.shadow, ema_text.shadow
    pipe.register_modules(unet=ema_unet.shadow, text_encoder=ema_text.shadow)
    return history


def build_pipeline(recipe: PipelineConfig, world: WorldConfig, *, progress: bool = True):
    """Train the whole pipeline from scratch. Returns (pipeline, training log)."""
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    pipe = build_untrained(recipe, world)
    vae_log = train_vae(pipe.vae, recipe, world, progress=progress)
    latents, batch = encode_pool(pipe.vae, recipe, world)
    unet_log = train_unet(pipe, latents, batch.factors, recipe, world, progress=progress)
    for module in (pipe.vae, pipe.unet, pipe.text_encoder):
        module.eval().requires_grad_(False)
    log = {
        "vae_final_rec": float(np.mean([h["rec"] for h in vae_log[-50:]])),
        "unet_final_loss": float(np.mean([h["loss"] for h in unet_log[-200:]])),
        "scaling_factor": float(pipe.vae.config.scaling_factor),
    }
    return pipe, log
