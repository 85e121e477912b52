"""Captioners: images -> text, pluggable. A captioner that fails on an image is a recorded skip.

A captioner is any object with `name` and `caption(images) -> list[str]`, images as (N, H, W, 3)
uint8 (the shapes world's `WorldCaptioner` is one, from `diffdissect.world`). Built in:
  * `TransformersCaptioner`: an image-to-text model of transformers (BLIP-style, or a
    vision-encoder-decoder), loaded offline from a local directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from diffdissect.errors import DiffdissectError, ModelLoadError


class Captioner(Protocol):
    name: str

    def caption(self, images: np.ndarray) -> list[str]: ...


@dataclass
class CaptionResult:
    captions: list[str | None]  # None where the captioner failed
    errors: list[str | None]  # the failure, per image

    @property
    def failed(self) -> int:
        return sum(e is not None for e in self.errors)


def caption_images(captioner: Captioner, images: np.ndarray, batch: int = 64) -> CaptionResult:
    """Caption in batches; a batch that raises is retried image by image so only the bad ones are lost."""
    captions: list[str | None] = []
    errors: list[str | None] = []
    for start in range(0, len(images), batch):
        part = images[start : start + batch]
        try:
            out = list(captioner.caption(part))
            if len(out) != len(part):
                raise DiffdissectError(
                    f"captioner {captioner.name} returned {len(out)} captions for {len(part)} images"
                )
            captions += out
            errors += [None] * len(out)
            continue
        except Exception:  # noqa: BLE001 - find the images that fail, keep the rest
            pass
        for image in part:
            try:
                (text,) = captioner.caption(image[None])
                captions.append(str(text))
                errors.append(None)
            except Exception as err:  # noqa: BLE001 - recorded per image
                captions.append(None)
                errors.append(f"{type(err).__name__}: {err}")
    return CaptionResult(captions, errors)


class TransformersCaptioner:
    """A transformers image-to-text model from a local directory (no download): processor + generate."""

    def __init__(self, path: str | Path, *, max_new_tokens: int = 30, device: str = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"no transformers model at {path} (config.json missing); pass a directory saved "
                "with save_pretrained (model and processor), e.g. a BLIP captioning checkpoint."
            )
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(
                f"could not load an image-to-text model and its processor from {path}: {err}"
            ) from None
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.name = f"transformers:{path.name}"

    @torch.no_grad()
    def caption(self, images: np.ndarray) -> list[str]:
        from PIL import Image

        pil = [Image.fromarray(np.asarray(im, np.uint8)) for im in images]
        inputs = self.processor(images=pil, return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def load_captioner(spec: str) -> Captioner:
    """A local transformers image-to-text directory (the shapes world's captioner: `ShapesWorld.captioner()`)."""
    return TransformersCaptioner(spec)
