"""Tiny, randomly initialised pipelines of today's families, built with stock diffusers/transformers and
tokenizers made locally (no download): SDXL, SD3, FLUX.1 (dev: guidance embedding; schnell: none),
PixArt-alpha and Sana. Deterministic per seed, CPU, eval mode; for tests and `bench capture`.

Sizes: 32x32-pixel images; the AutoencoderKL (SDXL, SD3, FLUX, PixArt) and the AutoencoderDC (Sana) both
compress 4x, to 4x8x8 latents. FLUX packs them 2x2 into 16 tokens of 16 channels; its transformer names
no sample size, so load it with `resolution=32` (its pipeline's default is 1024 px).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import diffusers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from diffdissect.models.text import build_clip_tokenizer
from diffdissect.models.tiny import _seeded, _tiny_vae

__all__ = [
    "FAMILY_BUILDERS",
    "tiny_flux_pipeline",
    "tiny_pixart_pipeline",
    "tiny_sana_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sdxl_pipeline",
]

WORDS = ("a", "an", "the", "of", "photo", "red", "green", "blue", "circle", "square", "cat", "dog")
CLIP_TOKENS = 16  # short CLIP context: fast tests (real models: 77)
T5_TOKENS = 32


def _clip_tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer(WORDS, CLIP_TOKENS)


def _clip(tokenizer: CLIPTokenizer, hidden: int, projection: int | None = None):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=projection or hidden,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def _t5_tokenizer() -> T5Tokenizer:
    """A Unigram T5 tokenizer: every word of WORDS one piece, letters for anything else."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_TOKENS)


def _t5(tokenizer: T5Tokenizer, d_model: int = 32) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_ff=2 * d_model,
            d_kv=8,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()


def _gemma_tokenizer(texts: list[str]) -> GemmaTokenizer:
    """A byte-fallback-free BPE Gemma tokenizer trained on `texts` (Sana's instruction and WORDS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    with tempfile.TemporaryDirectory() as d:
        GemmaTokenizer(vocab=model["vocab"], merges=merges, model_max_length=2048).save_pretrained(d)
        return GemmaTokenizer.from_pretrained(Path(d))


def _shifted_vae(seed: int) -> diffusers.AutoencoderKL:
    """The tiny AutoencoderKL with a latent shift, as SD3's and FLUX's VAEs have."""
    return _tiny_vae(seed, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)


def tiny_sdxl_pipeline(seed: int = 0) -> diffusers.StableDiffusionXLPipeline:
    """SDXL: two CLIP encoders (16 + 16 wide, the second with a 16-dim projection), a text_time UNet."""
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    with _seeded(seed):
        text_encoder = _clip(tokenizer, 16)
        text_encoder_2 = _clip(tokenizer_2, 16, projection=16)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 16,
            cross_attention_dim=32,
            norm_num_groups=8,
        ).eval()
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return diffusers.StableDiffusionXLPipeline(
        vae=_tiny_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def tiny_sd3_pipeline(seed: int = 0) -> diffusers.StableDiffusion3Pipeline:
    """SD3: CLIP-L + CLIP-G (16 + 16, pooled 32) + T5 (32), a 2-block MMDiT on 16 tokens, shift 3."""
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    with _seeded(seed):
        text_encoder = _clip(tokenizer, 16, projection=16)
        text_encoder_2 = _clip(tokenizer_2, 16, projection=16)
        text_encoder_3 = _t5(tokenizer_3, 32)
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=32,
            pos_embed_max_size=8,
        ).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_shifted_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def tiny_flux_pipeline(seed: int = 0, guidance: bool = True) -> diffusers.FluxPipeline:
    """FLUX.1: CLIP (pooled 16) + T5 (32), 1 double- and 1 single-stream block, dynamic shift.

    guidance=True: a guidance-distilled model (dev); False: no guidance embedding (schnell).
    """
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    with _seeded(seed):
        text_encoder = _clip(tokenizer, 16)
        text_encoder_2 = _t5(tokenizer_2, 32)
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=guidance,
            axes_dims_rope=(2, 2, 4),
        ).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return diffusers.FluxPipeline(
        scheduler=scheduler,
        vae=_shifted_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def tiny_pixart_pipeline(seed: int = 0) -> diffusers.PixArtAlphaPipeline:
    """PixArt-alpha: T5 (32) with its attention mask, a 2-block ada_norm_single DiT, learned sigma."""
    tokenizer = _t5_tokenizer()
    with _seeded(seed):
        text_encoder = _t5(tokenizer, 32)
        transformer = diffusers.PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=16,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ).eval()
    return diffusers.PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_tiny_vae(seed),
        transformer=transformer,
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )


def tiny_sana_pipeline(seed: int = 0) -> diffusers.SanaPipeline:
    """Sana: Gemma2 (16), a 2-block linear-attention DiT, AutoencoderDC, DPMSolver with flow sigmas (shift 3)."""
    import inspect

    instruction = inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default
    tokenizer = _gemma_tokenizer([*instruction, *WORDS])
    with _seeded(seed):
        text_encoder = Gemma2Model(
            Gemma2Config(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=2048,
                pad_token_id=0,
                eos_token_id=1,
                bos_token_id=2,
            )
        ).eval()
        transformer = diffusers.SanaTransformer2DModel(
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=16,
            sample_size=8,
        ).eval()
        vae = diffusers.AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=2,
            encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8, 8),
            decoder_block_out_channels=(8, 8, 8),
            encoder_qkv_multiscales=((), (), (5,)),
            decoder_qkv_multiscales=((), (), (5,)),
            encoder_layers_per_block=(1, 1, 1),
            decoder_layers_per_block=(1, 1, 1),
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        ).eval()
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
    )
    return diffusers.SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


FAMILY_BUILDERS = {
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "pixart": tiny_pixart_pipeline,
    "sana": tiny_sana_pipeline,
}
