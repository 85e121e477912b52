"""A loaded diffusion target: the denoiser to dissect plus what it needs to be run on images."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from diffdissect.errors import SpecError
from diffdissect.models.identity import config_digest, content_digest, file_stats, scheduler_identity

TargetKind = Literal[
    "text_unet", "dit", "unet2d", "unet2d_condition", "transformer2d", "module", "sdxl", "sd3", "flux", "pixart", "sana"
]


FAMILY_CACHE_BATCHES = 64  # conditioning of this many batches of prompts is kept (SDXL/SD3/FLUX/PixArt/Sana)


@dataclass
class Target:
    """The denoiser (UNet / DiT transformer / any module) and its companions.

    `kind` decides how the denoiser is called:
      sd, unet2d_condition: denoiser(sample, t, encoder_hidden_states=...)
      dit, transformer2d:   denoiser(sample, timestep=t, class_labels=...)
      unet2d:               denoiser(sample, t[, class_labels=...])
      module:               denoiser(sample, t)
      sdxl, sd3, flux, pixart, sana: as their pipelines call them (`family`, models/families.py)
    """

    denoiser: Any  # an nn.Module; diffusers models carry .config and more
    scheduler: Any
    kind: TargetKind
    source: str
    resolution: int  # pixel resolution of image inputs
    pixel_channels: int = 3
    vae: Any = None  # AutoencoderKL (or None: pixel-space denoiser)
    text_encoder: Any = None
    tokenizer: Any = None
    pipeline: Any = None
    null_class: int | None = None  # class id meaning "unconditional" (DiT), if any
    id2label: dict[int, str] = field(default_factory=dict)
    random_init_seed: int | None = None  # set when the denoiser was re-initialised (control)
    model_dir: str | None = None  # the directory it was loaded from (its files key the digest cache)
    family: Any = None  # SDXL/SD3/FLUX/PixArt/Sana: a models.families.Family
    _prompt_cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    _identity_memo: dict[str, Any] = field(default_factory=dict, repr=False)
    truncated_prompts: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)

    # ---- properties --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def takes_text(self) -> bool:
        return self.kind in ("text_unet", "unet2d_condition") or self.family is not None

    @property
    def takes_class(self) -> bool:
        if self.kind in ("dit", "transformer2d"):
            return True
        return self.kind == "unet2d" and getattr(self.denoiser.config, "num_class_embeds", None) is not None

    @property
    def cfg_cond_first(self) -> bool:
        """Under classifier-free guidance, is the conditional half first in the batch? (DiT: yes, SD: no)."""
        return self.kind == "dit"

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the denoiser's input."""
        cfg = getattr(self.denoiser, "config", None)
        if self.family is not None:
            channels = self.family.latent_channels(self)
        else:
            channels = int(getattr(cfg, "in_channels", None) or self.denoiser.in_channels)
        size = self.resolution // self.vae_scale_factor
        return channels, size, size

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        factor = getattr(self.pipeline, "vae_scale_factor", None)
        if factor:
            return int(factor)
        blocks = self.vae.config.get("block_out_channels") or self.vae.config.get("encoder_block_out_channels")
        return 2 ** (len(blocks) - 1)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Target:
        for module in (self.denoiser, self.vae, self.text_encoder):
            if module is not None:
                module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
        if self.family is not None:  # the other text encoders: conditioning is cast to the denoiser's dtype
            self.pipeline.to(device)
        self._prompt_cache.clear()
        return self

    # ---- running -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) -> the denoiser's clean input x0 (VAE latent mean, scaled)."""
        pixels = pixels.to(self.device, self.dtype)
        if self.vae is None:
            return pixels
        encoded = self.vae.encode(pixels)
        dist = getattr(encoded, "latent_dist", None)
        latents = dist.mean if dist is not None else encoded.latent  # AutoencoderDC (Sana) is deterministic
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `encode_images`: the denoiser's x0 -> pixels (B, 3, H, W), [-1, 1] up to VAE overshoot."""
        if self.vae is None:
            return latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Encoder hidden states for prompts (cached per prompt). The empty prompt is SD's unconditional."""
        if self.family is not None:
            raise SpecError(
                f"{self.family.name} is conditioned through its pipeline's encode_prompt (several encoders, "
                "pooled embeddings); this step supports single-encoder models (SD 1.x/2.x) only."
            )
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            if self.text_encoder is None or self.tokenizer is None:
                dim = int(self.denoiser.config.cross_attention_dim)
                for p in missing:
                    if p:
                        raise SpecError(
                            "this model has no text encoder, so prompts cannot be encoded; "
                            "load a full pipeline directory, or capture without prompts."
                        )
                    # bare conditional UNet: the 'empty' context is a single zero token
                    self._prompt_cache[p] = torch.zeros(1, dim, device=self.device, dtype=self.dtype)
            else:
                self.note_truncation(missing)
                ids = self.tokenizer(
                    missing,
                    padding="max_length",
                    truncation=True,
                    max_length=self.tokenizer.model_max_length,
                    return_tensors="pt",
                ).input_ids
                hidden = self.text_encoder(ids.to(self.device))[0].to(self.dtype)
                for p, h in zip(missing, hidden):
                    self._prompt_cache[p] = h
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def note_truncation(self, prompts: list[str]) -> None:
        """Record prompts longer than the tokenizer's limit: the encoder sees only their first tokens."""
        limit = int(self.tokenizer.model_max_length)
        for prompt in prompts:
            ids = self.tokenizer(prompt, truncation=False).input_ids
            if len(ids) > limit:
                dropped = self.tokenizer.decode(ids[limit - 1 :], skip_special_tokens=True)
                self.truncated_prompts[prompt] = {"tokens": len(ids), "kept": limit, "dropped_text": dropped}

    def conditioning(self, prompts: list[str] | None, class_labels: list[int] | None, batch: int) -> dict[str, Any]:
        """Keyword arguments for the denoiser for one batch."""
        if self.family is not None:
            key = ("family", tuple(prompts or [""] * batch))
            if key not in self._prompt_cache:
                # per batch of prompts (capture revisits a shard's batches at every seed and t); bounded, so
                # per-image captions over a large folder cannot fill memory with T5/Gemma states
                while len(self._prompt_cache) >= FAMILY_CACHE_BATCHES:
                    self._prompt_cache.pop(next(iter(self._prompt_cache)))
                if self.tokenizer is not None:
                    self.note_truncation([p for p in dict.fromkeys(key[1]) if p not in self.truncated_prompts])
                with torch.no_grad():
                    self._prompt_cache[key] = self.family.conditioning(self, list(key[1]))
            return self._prompt_cache[key]
        if self.takes_text:
            return {"encoder_hidden_states": self.text_embeddings(prompts or [""] * batch)}
        if self.takes_class:
            if class_labels is None:
                if self.null_class is None:
                    raise SpecError(
                        "this class-conditional model has no null (unconditional) class; "
                        "pass --class-label N or --labels-as-classes."
                    )
                class_labels = [self.null_class] * batch
            self.check_class_ids(class_labels)
            return {"class_labels": torch.tensor(class_labels, device=self.device, dtype=torch.long)}
        return {}

    def check_class_ids(self, class_labels: list[int]) -> None:
        """Class ids the model has an embedding for: 0..n-1 (and DiT's null class n)."""
        cfg = getattr(self.denoiser, "config", None)
        n = getattr(cfg, "num_embeds_ada_norm", None) or getattr(cfg, "num_class_embeds", None)
        if n is None:
            return
        allowed = int(n) + (1 if self.null_class is not None else 0)
        bad = sorted({int(c) for c in class_labels if not 0 <= int(c) < allowed})
        if bad:
            raise SpecError(
                f"class ids {bad[:5]} are out of range: this model has classes 0..{int(n) - 1}"
                + (f" (and the null class {self.null_class})" if self.null_class is not None else "")
                + "; pass a class id in that range."
            )

    def call_arguments(self, sample: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> tuple[tuple, dict]:
        """(args, kwargs) of one denoiser call, in the calling convention of this kind."""
        if self.family is not None:
            return self.family.call_arguments(self, sample, t, cond)
        if self.kind in ("dit", "transformer2d"):
            return (sample,), {"timestep": t, **cond}
        return (sample, t), dict(cond)

    def timestep_argument(self, level: Any, batch: int) -> torch.Tensor:
        """The timestep tensor handed to the denoiser at a noise level (models.levels.NoiseLevel)."""
        if level.process == "ddpm":
            return torch.full((batch,), int(level.t), device=self.device, dtype=torch.long)
        return torch.full((batch,), float(level.denoiser_t), device=self.device, dtype=torch.float32)

    def noise_levels(self, timesteps: list[int] | None, sigmas: list[float] | None = None) -> list[Any]:
        """Noise levels at training indices (or, flow models, at sigmas): see models.levels."""
        from diffdissect.models.levels import flow_schedule, levels_for, process_of

        flow = None
        if process_of(self.scheduler) == "flow":
            flow = self.family.flow(self) if self.family is not None else flow_schedule(self.scheduler)
        return levels_for(self.scheduler, timesteps, sigmas, flow=flow)

    def forward(self, sample: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> Any:
        args, kwargs = self.call_arguments(sample, t, cond)
        return self.denoiser(*args, **kwargs)

    def dry_inputs(self, t: int | None = None, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """A zero sample, a timestep and default conditioning: enough for a shape-probing forward."""
        c, h, w = self.sample_shape()
        sample = torch.zeros(batch, c, h, w, device=self.device, dtype=self.dtype)
        t = self.num_train_timesteps // 2 if t is None else t
        timestep = self.timestep_argument(self.noise_levels([int(t)])[0], batch)
        return sample, timestep, self.conditioning(None, None, batch)

    # ---- identity ----------------------------------------------------------------------------
    def identity(self, known: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the manifest records about the model: enough to refuse mixing two models' data.

        `content_sha256` covers the full content of the denoiser, VAE, text encoder(s), tokenizer(s) and scheduler
        config (see :mod:`diffdissect.models.identity`); `source` and `files` say where it was loaded from and are
        never compared. `known`: an identity recorded earlier (a store's manifest); when the model directory's
        files still have the sizes and mtimes it lists, its digest is reused instead of rehashing the weights.
        Within one process the digest is memoised per component object: changing weights in place afterwards is
        not seen (load the model again).
        """
        dtype = str(self.dtype).split(".")[-1]
        files = file_stats(self.model_dir)
        modules, tokenizers = self._components()
        key = repr(([id(m) for _, m in modules], self.random_init_seed, dtype))
        if self._identity_memo.get("key") == key:
            content = self._identity_memo["content"]
        elif (
            known
            and files
            and known.get("files") == files
            and known.get("dtype") == dtype
            and known.get("random_init_seed") == self.random_init_seed
            and known.get("content_sha256")
        ):
            content = known["content_sha256"]
        else:
            content = content_digest(modules, tokenizers, self.scheduler)
        self._identity_memo.update(key=key, content=content)
        return {
            "source": self.source,
            "files": files,
            "kind": self.kind,
            "class": type(self.denoiser).__name__,
            "content_sha256": content,
            "config_sha256": config_digest(
                getattr(self.denoiser, "config", None) or {"repr": repr(self.denoiser)[:2000]}
            ),
            "weights_fingerprint": weights_fingerprint(self.denoiser),
            "num_parameters": sum(p.numel() for p in self.denoiser.parameters()),
            "scheduler": type(self.scheduler).__name__,
            "scheduler_config_sha256": scheduler_identity(self.scheduler)["config_sha256"],
            "num_train_timesteps": self.num_train_timesteps,
            "resolution": self.resolution,
            "latent": self.is_latent,
            "dtype": dtype,
            "random_init_seed": self.random_init_seed,
            **({"family": self.family.name} if self.family is not None else {}),
        }

    def _components(self) -> tuple[list[tuple[str, nn.Module | None]], list[Any]]:
        """Every module and tokenizer that shapes stored numbers, in a fixed order."""
        modules: list[tuple[str, nn.Module | None]] = [
            ("denoiser", self.denoiser),
            ("vae", self.vae),
            ("text_encoder", self.text_encoder),
        ]
        tokenizers = [self.tokenizer]
        seen = {id(m) for _, m in modules if m is not None}
        components = getattr(self.pipeline, "components", None) or {}
        for name, part in sorted(components.items()):
            if isinstance(part, nn.Module) and id(part) not in seen and name not in ("unet", "transformer"):
                modules.append((name, part))
                seen.add(id(part))
            elif name.startswith("tokenizer") and part is not None and part is not self.tokenizer:
                tokenizers.append(part)
        return modules, tokenizers


def weights_fingerprint(module: nn.Module, per_tensor: int = 64) -> str:
    """A cheap digest of the weights: names, shapes and the first values of every tensor.

    Kept for compatibility (inverters trained before store format 2 record it); it is never the identity
    of a model: see `content_sha256`."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().flatten()[:per_tensor].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
