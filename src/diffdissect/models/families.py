"""Today's text-to-image families: SDXL, SD3/SD3.5, FLUX.1, PixArt-alpha/Sigma and Sana.

Each family says how its denoiser is really called: the conditioning comes from the pipeline's own
`encode_prompt` and helpers (never re-implemented here), the timestep argument follows its pipeline's
convention, FLUX's latents are packed 2x2 with image/text ids, and the noise levels are DDPM or flow
matching with the scheduler's (dynamic) shift. `Target` delegates to the family when it has one.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from diffdissect.errors import ModelLoadError, SpecError
from diffdissect.models.levels import FlowSchedule, flow_schedule, process_of

if TYPE_CHECKING:
    from diffdissect.models.target import Target

# Joint (MMDiT) blocks: called with hidden_states (image) and encoder_hidden_states (text), they return
# (text, image). FLUX's single-stream blocks take and return the two streams separately in diffusers >= 0.32.
JOINT_BLOCKS = frozenset({"JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock"})


def _call_default(pipe: Any, name: str, fallback: Any) -> Any:
    """A default of the pipeline's own `__call__` (so image capture conditions as sampling does)."""
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default


class Family:
    """How one pipeline family runs its denoiser. Subclasses fill in the family-specific parts."""

    name: str = ""
    required: tuple[str, ...] = ()  # pipeline components the family cannot run without
    timestep_scale: float = 1.0  # denoiser argument = sigma * N * timestep_scale (flow)

    def __init__(self, guidance_embedding: float | None = None) -> None:
        self.guidance_embedding = guidance_embedding  # FLUX-dev: the guidance the model is conditioned on

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---- loading ---------------------------------------------------------------------------------

    def check_components(self, pipe: Any, source: str) -> None:
        missing = [c for c in self.required if getattr(pipe, c, None) is None]
        if missing:
            raise ModelLoadError(
                f"{source}: this {self.name} pipeline has no {', '.join(missing)}; {self.name} "
                f"needs {', '.join(self.required)}. Save the complete pipeline with save_pretrained."
            )

    # ---- shapes ----------------------------------------------------------------------------------
    def latent_channels(self, target: Target) -> int:
        return int(target.denoiser.config.in_channels)

    def image_seq_len(self, target: Target) -> int:
        _, h, w = target.sample_shape()
        p = int(getattr(target.denoiser.config, "patch_size", 1) or 1)
        return (h // p) * (w // p)

    # ---- noise levels ----------------------------------------------------------------------------
    def flow(self, target: Target) -> FlowSchedule | None:
        if process_of(target.scheduler) != "flow":
            return None
        return flow_schedule(target.scheduler, mu=self.mu(target), scale=self.timestep_scale_of(target))

    def mu(self, target: Target) -> float | None:
        return None

    def timestep_scale_of(self, target: Target) -> float:
        return self.timestep_scale

    # ---- running ---------------------------------------------------------------------------------
    def conditioning(self, target: Target, prompts: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def call_arguments(
        self, target: Target, sample: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]
    ) -> tuple[tuple, dict]:
        return (sample,), {"timestep": t, **cond}

    def to_grid(self, target: Target, layer: str, tokens: torch.Tensor) -> torch.Tensor | None:
        """A family-specific token -> grid map (None: the square token grid)."""
        return None

    def pipeline_kwargs(self, target: Target) -> dict[str, Any]:
        """Extra arguments of a sampling call (trajectories)."""
        return {"height": target.resolution, "width": target.resolution}

    def cfg_halves(self) -> bool:
        """Does the pipeline batch [unconditional, conditional] under guidance?"""
        return True


def _device(target: Target) -> torch.device:
    return target.device


class SDXL(Family):
    name = "SDXL"
    required = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    def conditioning(self, target: Target, prompts: list[str]) -> dict[str, Any]:
        pipe = target.pipeline
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device=_device(target), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = (target.resolution, target.resolution)
        time_ids = pipe._get_add_time_ids(
            size,
            (0, 0),
            size,
            dtype=embeds.dtype,
            text_encoder_projection_dim=int(pipe.text_encoder_2.config.projection_dim),
        )
        return {
            "encoder_hidden_states": embeds.to(target.dtype),
            "added_cond_kwargs": {
                "text_embeds": pooled.to(target.dtype),
                "time_ids": time_ids.to(target.device).repeat(len(prompts), 1),
            },
        }

    def call_arguments(self, target, sample, t, cond):
        return (sample, t), dict(cond)


class SD3(Family):
    name = "SD3"
    required = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    timestep_scale = 1.0  # the transformer takes sigma * 1000

    def mu(self, target: Target) -> float | None:
        config = target.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        return float(
            calculate_shift(
                self.image_seq_len(target),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        )

    def conditioning(self, target: Target, prompts: list[str]) -> dict[str, Any]:
        pipe = target.pipeline
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=_device(target),
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=_call_default(pipe, "max_sequence_length", 256),
        )
        return {"encoder_hidden_states": embeds.to(target.dtype), "pooled_projections": pooled.to(target.dtype)}

    def call_arguments(self, target, sample, t, cond):
        return (), {"hidden_states": sample, "timestep": t, **cond}


class Flux(Family):
    name = "FLUX"
    required = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    timestep_scale = 1.0 / 1000  # the pipeline hands the transformer timestep / 1000

    def latent_channels(self, target: Target) -> int:
        return int(target.denoiser.config.in_channels) // 4

    def image_seq_len(self, target: Target) -> int:
        _, h, w = target.sample_shape()
        return (h // 2) * (w // 2)

    def mu(self, target: Target) -> float | None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = target.scheduler.config
        return float(
            calculate_shift(
                self.image_seq_len(target),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        )

    @property
    def guided(self) -> bool:
        return self.guidance_embedding is not None

    def guidance_value(self, target: Target) -> float | None:
        if not target.denoiser.config.guidance_embeds:
            if self.guidance_embedding is not None:
                raise SpecError(
                    "--guidance-embedding was given, but this FLUX model has no guidance embedding "
                    "(a timestep-distilled model such as FLUX.1-schnell); drop it."
                )
            return None
        if self.guidance_embedding is not None:
            return float(self.guidance_embedding)
        return float(_call_default(target.pipeline, "guidance_scale", 3.5))

    def conditioning(self, target: Target, prompts: list[str]) -> dict[str, Any]:
        pipe = target.pipeline
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=_device(target),
            num_images_per_prompt=1,
            max_sequence_length=_call_default(pipe, "max_sequence_length", 512),
        )
        _, h, w = target.sample_shape()
        image_ids = pipe._prepare_latent_image_ids(len(prompts), h // 2, w // 2, target.device, target.dtype)
        cond: dict[str, Any] = {
            "encoder_hidden_states": embeds.to(target.dtype),
            "pooled_projections": pooled.to(target.dtype),
            "txt_ids": text_ids.to(target.dtype),
            "img_ids": image_ids,
        }
        g = self.guidance_value(target)
        cond["guidance"] = (
            None if g is None else torch.full((len(prompts),), g, device=target.device, dtype=torch.float32)
        )
        return cond

    def pack(self, target: Target, sample: torch.Tensor) -> torch.Tensor:
        b, c, h, w = sample.shape
        return target.pipeline._pack_latents(sample, b, c, h, w)

    def call_arguments(self, target, sample, t, cond):
        if sample.ndim == 4:
            sample = self.pack(target, sample)
        cond = dict(cond)
        guidance = cond.get("guidance")
        if guidance is not None and guidance.shape[0] != sample.shape[0]:
            cond["guidance"] = guidance[:1].expand(sample.shape[0])
        return (), {"hidden_states": sample, "timestep": t, **cond}

    def to_grid(self, target: Target, layer: str, tokens: torch.Tensor) -> torch.Tensor | None:
        """The transformer's packed output (proj_out: 2x2 patches of latent channels) -> the latent grid."""
        if tokens.shape[-1] != int(target.denoiser.config.in_channels) or layer.split("@")[0] != "proj_out":
            return None
        return target.pipeline._unpack_latents(tokens, target.resolution, target.resolution, target.vae_scale_factor)

    def pipeline_kwargs(self, target: Target) -> dict[str, Any]:
        return {"height": target.resolution, "width": target.resolution}

    def cfg_halves(self) -> bool:
        return False  # guidance is an embedding (dev) or absent (schnell)


class PixArt(Family):
    name = "PixArt"
    required = ("text_encoder", "tokenizer")

    def conditioning(self, target: Target, prompts: list[str]) -> dict[str, Any]:
        pipe = target.pipeline
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=_device(target),
            clean_caption=False,
            max_sequence_length=_call_default(pipe, "max_sequence_length", 120),
        )
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if target.denoiser.config.sample_size == 128:  # the pipeline's own test for micro-conditions
            r = float(target.resolution)
            added = {
                "resolution": torch.tensor([[r, r]], device=target.device, dtype=target.dtype).repeat(len(prompts), 1),
                "aspect_ratio": torch.ones(len(prompts), 1, device=target.device, dtype=target.dtype),
            }
        return {
            "encoder_hidden_states": embeds.to(target.dtype),
            "encoder_attention_mask": mask,
            "added_cond_kwargs": added,
        }

    def call_arguments(self, target, sample, t, cond):
        return (sample,), {"timestep": t, **cond}

    def pipeline_kwargs(self, target: Target) -> dict[str, Any]:
        return {"height": target.resolution, "width": target.resolution, "use_resolution_binning": False}


class Sana(Family):
    name = "Sana"
    required = ("text_encoder", "tokenizer")

    def timestep_scale_of(self, target: Target) -> float:
        return float(getattr(target.denoiser.config, "timestep_scale", 1.0) or 1.0)

    def conditioning(self, target: Target, prompts: list[str]) -> dict[str, Any]:
        pipe = target.pipeline
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=_device(target),
            clean_caption=False,
            max_sequence_length=_call_default(pipe, "max_sequence_length", 300),
            complex_human_instruction=_call_default(pipe, "complex_human_instruction", None),
        )
        return {"encoder_hidden_states": embeds.to(target.dtype), "encoder_attention_mask": mask}

    def call_arguments(self, target, sample, t, cond):
        return (sample,), {"timestep": t, **cond}

    def pipeline_kwargs(self, target: Target) -> dict[str, Any]:
        return {"height": target.resolution, "width": target.resolution, "use_resolution_binning": False}


PIPELINE_FAMILIES: dict[str, type[Family]] = {
    "StableDiffusionXLPipeline": SDXL,
    "StableDiffusion3Pipeline": SD3,
    "FluxPipeline": Flux,
    "PixArtAlphaPipeline": PixArt,
    "PixArtSigmaPipeline": PixArt,
    "SanaPipeline": Sana,
}
# Denoisers that only run inside their pipeline (text encoders, packing, a flow scheduler).
PIPELINE_ONLY_DENOISERS = {
    "SD3Transformer2DModel": "SD3",
    "FluxTransformer2DModel": "FLUX",
    "SanaTransformer2DModel": "Sana",
    "PixArtTransformer2DModel": "PixArt",
}
# Text-conditioned transformer pipelines diffdissect does not model yet: a clear refusal naming them.
UNSUPPORTED = (
    "AuraFlow",
    "Lumina",
    "HunyuanDiT",
    "CogView",
    "Kolors",
    "StableCascade",
    "Kandinsky",
    "Wuerstchen",
    "LuminaText2Img",
    "Chroma",
    "HiDream",
    "CogVideoX",
    "Wan",
    "LTX",
    "Mochi",
    "Allegro",
    "Latte",
    "Qwen",
)


def family_of(pipe: Any, source: str, guidance_embedding: float | None = None) -> Family | None:
    """The family of a loaded pipeline, None for the classic ones (SD 1.x/2.x, DiT) that need none."""
    name = type(pipe).__name__
    cls = PIPELINE_FAMILIES.get(name)
    if cls is None:
        # a subclass of a supported pipeline (e.g. a user's own) is that family
        for base in type(pipe).__mro__[1:]:
            if base.__name__ in PIPELINE_FAMILIES:
                cls = PIPELINE_FAMILIES[base.__name__]
                break
    if cls is None:
        return None
    family = cls(guidance_embedding) if cls is Flux else cls()
    family.check_components(pipe, source)
    if guidance_embedding is not None and cls is not Flux:
        raise SpecError(
            f"--guidance-embedding is for guidance-distilled FLUX models; {source} is {family.name}. "
            "Its guidance is classifier-free (trajectories: --guidance)."
        )
    return family
