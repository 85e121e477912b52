"""Resize and centre-crop images to a model's pixel resolution, as tensors in [-1, 1]."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., :3])


def to_model_pixels(image: Image.Image | np.ndarray, resolution: int) -> torch.Tensor:
    """(3, resolution, resolution) float32 in [-1, 1]: shorter side resized, centre crop."""
    img = to_pil(image)
    w, h = img.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
