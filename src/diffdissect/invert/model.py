"""The conditional model: a diffusers ControlNetModel copied from the frozen UNet, with FeatInv's hint
block in place of its pixel-space conditioning embedding.

Hint block: upsample the feature map to the latent grid, conv 3x3, SiLU, conv 3x3, SiLU, and a
zero-initialised conv 3x3 to the UNet's first block width, so at step 0 the ControlNet adds nothing
and the frozen UNet is unchanged. Saved as safetensors + JSON (config, feature shape, the pipeline's
identity); loading for another pipeline or other features is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from diffdissect.atomic import atomic_write_bytes, atomic_write_json
from diffdissect.errors import DiffdissectError
from diffdissect.invert.features import FeatureError
from diffdissect.models.identity import check_same_model

FORMAT = "diffdissect-inverter"
FORMAT_VERSION = 1


class HintBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, latent_grid: tuple[int, int], hidden: int = 64):
        super().__init__()
        self.latent_grid = tuple(latent_grid)
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.zero = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if tuple(features.shape[-2:]) != self.latent_grid:
            features = F.interpolate(features, size=self.latent_grid, mode="bilinear", align_corners=False)
        return self.zero(F.silu(self.conv2(F.silu(self.conv1(features)))))


def build_controlnet(unet, feature_channels: int, latent_grid: tuple[int, int], hidden: int = 64):
    """ControlNetModel.from_unet (weights copied from the UNet's encoder) with the hint block swapped in."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=feature_channels)
    controlnet.controlnet_cond_embedding = HintBlock(
        feature_channels, unet.config.block_out_channels[0], latent_grid, hidden
    )
    return controlnet


class Inverter(nn.Module):
    """The trainable part: the ControlNet (hint block inside). `info` says what it was trained on."""

    def __init__(self, controlnet: nn.Module, info: dict[str, Any]):
        super().__init__()
        self.controlnet = controlnet
        self.info = info

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return tuple(self.info["feature_shape"])

    def check_features(self, features: torch.Tensor) -> None:
        if tuple(features.shape[1:]) != self.feature_shape:
            c, h, w = self.feature_shape
            raise FeatureError(
                f"feature maps of shape {tuple(features.shape[1:])} do not fit this inverter, trained on "
                f"{c} channels on a {h}x{w} grid ({self.info['classifier']} layer {self.info['layer']!r}, "
                f"{self.info['mode']}); extract features with the same classifier and layer."
            )

    def residuals(self, noisy: torch.Tensor, t: torch.Tensor, text_states: torch.Tensor, features: torch.Tensor):
        down, mid = self.controlnet(
            noisy, t, encoder_hidden_states=text_states, controlnet_cond=features, return_dict=False
        )
        return down, mid


def controlled_prediction(unet, inverter: Inverter, noisy, t, text_states, features):
    down, mid = inverter.residuals(noisy, t, text_states, features)
    return unet(
        noisy,
        t,
        encoder_hidden_states=text_states,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample


def save_inverter(
    inverter: Inverter,
    directory: str | Path,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in inverter.controlnet.state_dict().items()}
    metadata = {"step": str((state or {}).get("step", 0))}  # checked against config.json on resume
    atomic_write_bytes(directory / "inverter.safetensors", safetensors_bytes(tensors, metadata=metadata))
    if extra_tensors is not None:
        atomic_write_bytes(
            directory / "optimizer.safetensors",
            safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, metadata=metadata),
        )
    atomic_write_json(
        directory / "config.json",
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "controlnet_config": _stable(dict(inverter.controlnet.config)),
            **inverter.info,
            "state": state or {},
        },
    )


def _stable(config: dict[str, Any]) -> dict[str, Any]:
    """diffusers lists `_use_default_values` from a set (its order changes between processes): sort it."""
    if isinstance(config.get("_use_default_values"), list):
        config["_use_default_values"] = sorted(config["_use_default_values"])
    return config


def load_inverter(directory: str | Path, *, pipeline_identity: dict[str, Any] | None = None) -> Inverter:
    from diffusers import ControlNetModel

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file() or not (directory / "inverter.safetensors").is_file():
        raise DiffdissectError(
            f"no inverter at {directory} (config.json + inverter.safetensors expected); train one "
            "with `diffdissect invert train`."
        )
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT or int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise DiffdissectError(
            f"{directory} is not an inverter this diffdissect reads (format {config.get('format')!r} "
            f"v{config.get('format_version')})."
        )
    if pipeline_identity is not None:
        # the content digest (or, for older inverters, the weights fingerprint), never the config digest alone;
        # the same weights loaded in another dtype are compared by class, config and parameter count (a warning)
        trained = config["pipeline"]
        check_same_model(
            trained,
            pipeline_identity,
            f"the inverter at {directory} was trained on",
            f"it was trained on {trained.get('source')}, the one given is "
            f"{pipeline_identity.get('source')}; invert with the pipeline it was trained on, or train "
            "a new one.",
            noun="diffusion pipeline",
        )
    controlnet = ControlNetModel.from_config(config["controlnet_config"])
    c, h, w = config["feature_shape"]
    controlnet.controlnet_cond_embedding = HintBlock(
        c, controlnet.config.block_out_channels[0], tuple(config["latent_grid"]), config.get("hint_hidden", 64)
    )
    controlnet.load_state_dict(load_file(directory / "inverter.safetensors"))
    info = {k: v for k, v in config.items() if k not in ("format", "format_version", "controlnet_config")}
    return Inverter(controlnet.eval(), info)
