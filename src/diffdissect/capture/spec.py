"""What to capture: plain dataclasses, validated against a target, recorded in the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from diffdissect.errors import SpecError

STORE_DTYPES = ("float16", "bfloat16", "float32")
Pooling = Literal["mean", "none"]


@dataclass
class OutputOptions:
    """How a captured tensor is turned into a stored row."""

    pooling: Pooling = "mean"
    """mean: one vector per input; none: full maps / tokens"""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """stored dtype"""
    tokens_to_grid: bool = False
    """reshape (B, N, D) tokens to (B, D, h, w)"""

    def validate(self) -> None:
        if self.pooling not in ("mean", "none"):
            raise SpecError(f"pooling must be 'mean' or 'none', not {self.pooling!r}.")
        if self.dtype not in STORE_DTYPES:
            raise SpecError(f"dtype must be one of {STORE_DTYPES}, not {self.dtype!r}.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class CaptureConfig(OutputOptions):
    """Capture from images noised at training timesteps t (larger = noisier), one or more noise seeds.

    Conditioning: the empty prompt (default); a fixed `prompt`; each input's caption
    (`use_captions`); for class-conditional models a fixed `class_label`, each input's label
    (`labels_as_classes`), or else the model's null class.
    """

    layers: list[str] = field(default_factory=list)
    """module paths, e.g. mid_block up_blocks.1; suffix @input, @update (output - input), @text (a joint
    block's text stream)"""
    timesteps: list[int] = field(default_factory=lambda: [100])
    """training-schedule indices in [0, T), larger = noisier"""
    seeds: list[int] = field(default_factory=lambda: [0])
    """noise seeds per input"""
    prompt: str | None = None
    """fixed prompt for every image (default: empty prompt)"""
    use_captions: bool = False
    """condition each image on its caption"""
    class_label: int | None = None
    """class-conditional: fixed class id"""
    labels_as_classes: bool = False
    """class-conditional: each image's label"""
    batch_size: int = 8
    """inputs per forward"""
    shard_size: int | None = None
    """inputs per shard [auto from --shard-mb]"""
    shard_mb: float = 256.0
    """target shard size in MB"""
    limit: int | None = None
    """capture only the first N inputs"""
    early_exit: bool = True
    """stop the forward after the last hooked layer (--no-early-exit: run the full forward)"""
    sigmas: list[float] | None = None
    """Flow-matching models: noise levels named by sigma in (0, 1] instead of --timesteps; each is stored
    under its nearest training index, with the exact sigma in the timestep table."""
    guidance_embedding: float | None = None
    """Guidance-distilled FLUX models (dev): the guidance value fed to the guidance embedding [the pipeline's
    default, 3.5]; refused for models without one (schnell) and other families."""

    def validate(self) -> None:
        super().validate()
        if not self.layers:
            raise SpecError("no layers given; list them with `diffdissect layers MODEL`.")
        if not self.timesteps:
            raise SpecError("no timesteps given (training indices, e.g. --timesteps 25 200).")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SpecError(f"seeds must be a non-empty list of distinct integers, not {self.seeds}.")
        if self.batch_size < 1 or (self.shard_size is not None and self.shard_size < 1):
            raise SpecError("batch_size and shard_size must be positive.")
        if not self.shard_mb > 0:
            raise SpecError(f"shard_mb must be a positive number of megabytes, not {self.shard_mb}.")
        if self.limit is not None and self.limit < 1:
            raise SpecError("limit must be positive.")
        if self.prompt is not None and self.use_captions:
            raise SpecError("choose one of a fixed prompt and per-image captions, not both.")
        if self.sigmas is not None and not self.sigmas:
            raise SpecError("--sigmas needs at least one value in (0, 1].")

    def data_fields(self) -> dict[str, Any]:
        """The fields that change the stored bytes (everything but early_exit, which changes nothing).

        sigmas and guidance_embedding are left out at their defaults (None), so a store made before they
        existed keeps its spec hash and resumes.
        """
        out = asdict(self)
        out.pop("early_exit")
        for name in ("sigmas", "guidance_embedding"):
            if out[name] is None:
                out.pop(name)
        return out


@dataclass
class TrajectoryConfig(OutputOptions):
    """Sample prompts with the pipeline's own sampler and capture layers at every denoising step.

    For DiT-like pipelines the prompts are class ids or class names.
    """

    prompts: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=lambda: ["mid_block"])
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 10
    """trajectory mode: sampler steps"""
    guidance_scale: float = 7.5
    """trajectory mode: guidance scale"""
    branch: Literal["cond", "uncond"] = "cond"
    """trajectory mode: which half of a guided batch to keep (CFG half)"""
    batch_size: int = 8
    shard_size: int = 64  # (prompt, seed) pairs per shard
    save_images: bool = True

    def validate(self) -> None:
        super().validate()
        if not self.prompts:
            raise SpecError("no prompts given.")
        empty = [i for i, p in enumerate(self.prompts) if not str(p).strip()]
        if empty:
            raise SpecError(
                f"prompts {empty[:5]} are empty; give each sample a prompt (for unconditional samples "
                "use a model without text conditioning, or say what you want)."
            )
        if not self.layers:
            raise SpecError("no layers given.")
        if self.steps < 1:
            raise SpecError("steps must be at least 1.")
        if self.branch not in ("cond", "uncond"):
            raise SpecError(f"branch must be cond or uncond, not {self.branch!r}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SpecError(f"seeds must be a non-empty list of distinct integers, not {self.seeds}.")

    def data_fields(self) -> dict[str, Any]:
        return asdict(self)


def __getattr__(name: str) -> object:  # the names before "one word for configs" (deprecated)
    from diffdissect.runtime import deprecated_alias

    return deprecated_alias(__name__, name, {"CaptureSpec": CaptureConfig, "TrajectorySpec": TrajectoryConfig})
