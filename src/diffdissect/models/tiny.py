"""Tiny, randomly initialised diffusers models, built deterministically from a seed (tests, demo, benchmarks).

Every builder runs on CPU under its own forked RNG, so the same seed gives bit-identical weights and the
caller's RNG state is left untouched. Each pipeline component is seeded on its own, so e.g.
``tiny_sd_pipeline(s).unet`` equals ``tiny_unet2d_condition(s)``. Models come back in eval mode, as from
``from_pretrained``.

Resolutions: the tiny VAE has three resolution levels, so ``vae_scale_factor == 4``.
- ``tiny_sd_pipeline(sample_size=8)``: 4x8x8 latents -> 3x32x32 images (pixels = 4 * sample_size).
- ``tiny_dit_pipeline()``: 4x8x8 latents (patch 2 -> 16 tokens) -> 3x32x32 images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn
from transformers import CLIPTokenizer

from diffdissect.models.text import build_clip_text_encoder, build_clip_tokenizer
from diffdissect.runtime import seeded

__all__ = [
    "TinyDenoiser",
    "sd15_unet",
    "sd15_unet_config",
    "tiny_denoiser",
    "tiny_dit_pipeline",
    "tiny_sd_pipeline",
    "tiny_unet2d",
    "tiny_unet2d_condition",
]

_TEXT_DIM = 16  # CLIP hidden size == UNet cross_attention_dim
_MAX_TOKENS = 77  # same context length as SD's CLIP tokenizer
_WORDS = ("a", "an", "the", "of", "photo", "red", "green", "blue", "circle", "square", "cat", "dog")
_DIT_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# DiTPipeline hard-codes the null (unconditional) class id as 1000 for classifier-free guidance, and
# LabelEmbedding puts the null row at index ``num_embeds_ada_norm``; so the table has 1000 class rows + the
# null row at index 1000, of which only 0..9 are labelled (id2label).
_DIT_NULL_CLASS = 1000


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Build on CPU under ``seed`` inside a forked RNG, leaving the caller's CPU/CUDA RNG state untouched."""
    with seeded(seed), torch.device("cpu"):
        yield


def _tiny_vae(seed: int, **config: Any) -> diffusers.AutoencoderKL:
    """Three-level AutoencoderKL (8, 16, 16 channels, 4 latent channels): vae_scale_factor 4.

    `config`: further AutoencoderKL settings (a family's latent shift and scale, quant convs)."""
    with _seeded(seed):
        return diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
            **config,
        ).eval()


def _tiny_unet_condition_config(sample_size: int) -> dict:
    """Config of a two-level cross-attention UNet2DConditionModel on 4-channel latents."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=_TEXT_DIM,
        attention_head_dim=2,  # diffusers' legacy name: this is the number of heads (SD-1.5 uses 8)
        norm_num_groups=8,
    )


def _tiny_tokenizer() -> CLIPTokenizer:
    """Offline CLIP BPE tokenizer over letters, digits, a few words; anything else maps to <|endoftext|> (unk)."""
    return build_clip_tokenizer(_WORDS, _MAX_TOKENS)


def tiny_sd_pipeline(seed: int = 0, sample_size: int = 8) -> diffusers.StableDiffusionPipeline:
    """Tiny random Stable Diffusion pipeline: ``sample_size``^2 latents, (4 * sample_size)^2 px images."""
    tokenizer = _tiny_tokenizer()
    with _seeded(seed):
        text_encoder = build_clip_text_encoder(tokenizer, _TEXT_DIM, layers=2, heads=2).eval()
    scheduler = diffusers.PNDMScheduler(  # SD-1.5's scheduler config
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return diffusers.StableDiffusionPipeline(
        vae=_tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet2d_condition(seed, sample_size),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_dit_pipeline(seed: int = 0) -> diffusers.DiTPipeline:
    """Tiny random class-conditional DiT pipeline: 8x8 latents, 32x32 px images, classes 0..9, null class 1000."""
    with _seeded(seed):
        transformer = diffusers.DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,  # learned sigma, like facebook/DiT-XL-2: the pipeline keeps the first 4 channels
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=_DIT_NULL_CLASS,
        ).eval()
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    id2label = dict(enumerate(_DIT_LABELS))
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=_tiny_vae(seed), scheduler=scheduler, id2label=id2label)
    pipe.register_to_config(id2label=id2label)  # DiTPipeline does not register it, so save_pretrained would drop it
    return pipe


def tiny_unet2d(seed: int = 0) -> diffusers.UNet2DModel:
    """Tiny random unconditional pixel-space UNet2DModel (3x16x16)."""
    with _seeded(seed):
        return diffusers.UNet2DModel(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            attention_head_dim=8,
            norm_num_groups=8,
        ).eval()


def tiny_unet2d_condition(seed: int = 0, sample_size: int = 8) -> diffusers.UNet2DConditionModel:
    """The tiny SD pipeline's UNet on its own (identical weights per seed; 16-dim text context)."""
    with _seeded(seed):
        return diffusers.UNet2DConditionModel(**_tiny_unet_condition_config(sample_size)).eval()


def sd15_unet_config() -> dict:
    """Init kwargs of Stable Diffusion 1.5's UNet2DConditionModel (its unet/config.json, sans metadata)."""
    return dict(
        act_fn="silu",
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        center_input_sample=False,
        cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        in_channels=4,
        layers_per_block=2,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
        norm_num_groups=32,
        out_channels=4,
        sample_size=64,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def sd15_unet(seed: int = 0) -> diffusers.UNet2DConditionModel:
    """Full-size SD-1.5 UNet (~860M params, fp32 on CPU) with random weights, for benchmarks."""
    with _seeded(seed):
        return diffusers.UNet2DConditionModel(**sd15_unet_config()).eval()


class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> (+ timestep bias) -> conv, with a residual connection."""

    def __init__(self, channels: int) -> None:
        """Create a residual block over ``channels`` channels with a ``channels``-dim timestep input."""
        super().__init__()
        self.norm = nn.GroupNorm(4, channels)
        self.time_proj = nn.Linear(channels, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` given the timestep embedding ``temb`` of shape (batch, channels)."""
        return x + self.conv(F.silu(self.norm(x)) + self.time_proj(temb)[:, :, None, None])


class TinyDenoiser(nn.Module):
    """Plain nn.Module denoiser: conv_in -> blocks.0 -> blocks.1 -> mid -> out, each block timestep-conditioned."""

    def __init__(self, in_channels: int = 3, channels: int = 16, sample_size: int = 16) -> None:
        """Create the denoiser; ``in_channels``/``sample_size`` tell tools the expected input shape."""
        super().__init__()
        self.in_channels, self.channels, self.sample_size = in_channels, channels, sample_size
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.time_embed = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.blocks = nn.ModuleList([_ResBlock(channels), _ResBlock(channels)])
        self.mid = _ResBlock(channels)
        self.out = nn.Sequential(nn.GroupNorm(4, channels), nn.SiLU(), nn.Conv2d(channels, in_channels, 3, padding=1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """Predict a tensor of ``sample``'s shape; ``timestep`` is a scalar or one value per batch item."""
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        temb = self.time_embed(get_timestep_embedding(t, self.channels).to(sample.dtype))
        h = self.conv_in(sample)
        for block in (*self.blocks, self.mid):
            h = block(h, temb)
        return self.out(h)


def tiny_denoiser(seed: int = 0) -> TinyDenoiser:
    """Tiny random TinyDenoiser (3x16x16 inputs)."""
    with _seeded(seed):
        return TinyDenoiser().eval()
