"""Pixel conversions (the one place they live) and resizing to a model's pixel resolution.

uint8 images are (N, H, W, 3) in [0, 255]; model pixels are (N, 3, H, W) float32 in [-1, 1]; a diffusers
pipeline's `output_type="np"` images are floats in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def uint8_to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]. Its inverse is `pixels_to_uint8`."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] (clamped) -> (N, H, W, 3) uint8, rounded to the nearest level, on the CPU."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def unit_to_uint8(images: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] (clipped) -> uint8, rounded to the nearest level."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.dtype != np.uint8:
        array = unit_to_uint8(array)
    return Image.fromarray(array[..., :3])


def to_model_pixels(image: Image.Image | np.ndarray, resolution: int) -> torch.Tensor:
    """(3, resolution, resolution) float32 in [-1, 1]: shorter side resized, centre crop."""
    img = to_pil(image)
    w, h = img.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        img = img.resize(
            (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BICUBIC
        )
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB with its brightness kept.

    PIL's own ``convert("RGB")`` clips 16- and 32-bit integer pixels (mode I;16, I) at 255, so a 16-bit grayscale
    PNG turns white; float pixels (F) are taken as [0, 1] when they lie there, else as 0-255. Palette, alpha and
    CMYK modes go through PIL's conversions (alpha is dropped; the colours under it are kept).
    """
    mode = image.mode
    if mode in ("RGB",):
        return image.copy()
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if mode == "F":
            scale = 255.0 if array.size and float(np.nanmax(array)) <= 1.0 else 1.0
        else:
            scale = 1.0 / 257.0  # 0..65535 -> 0..255 (16-bit data; also what PNG's I holds)
        gray = np.clip(np.nan_to_num(array * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1))
    if mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")
