"""Pixel conversions live in one place (data/transforms.py), and they invert each other."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from diffdissect.data.transforms import pixels_to_uint8, uint8_to_pixels, unit_to_uint8

SRC = Path(__file__).resolve().parents[1] / "src" / "diffdissect"


def test_uint8_and_model_pixels_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    pixels = uint8_to_pixels(images)
    assert pixels.shape == (3, 3, 5, 4) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(pixels[1, 2], torch.from_numpy(images[1, :, :, 2]).float() / 127.5 - 1)  # by hand
    assert np.array_equal(pixels_to_uint8(pixels), images)
    assert np.array_equal(pixels_to_uint8(torch.full((1, 3, 1, 1), 7.0)), np.full((1, 1, 1, 3), 255, np.uint8))
    assert np.array_equal(unit_to_uint8(np.array([-1.0, 0.0, 0.5, 0.999, 2.0])), [0, 0, 128, 255, 255])


def test_no_other_module_converts_pixels_by_hand():
    # `8 / 127.5,` (a PGD step size in pixel units) is not a conversion
    by_hand = re.compile(r"[*/] 127\.5\b(?! *[,)])|clip\([^)]*\) \* 255")
    offenders = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        if path.name != "transforms.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if by_hand.search(line)
    ]
    assert not offenders, f"convert pixels with diffdissect.data.transforms, not by hand: {offenders}"


def test_decode_latents_inverts_the_scaling_of_encode_images(sd_dir):
    from diffdissect.models import load_target

    target = load_target(sd_dir)
    pixels = uint8_to_pixels(
        np.random.default_rng(1).integers(0, 256, (2, target.resolution, target.resolution, 3), dtype=np.uint8)
    )
    latents = target.encode_images(pixels)
    vae = target.vae
    with torch.no_grad():
        by_hand = vae.decode(vae.encode(pixels).latent_dist.mean).sample  # the VAE alone, no scaling
    assert torch.allclose(target.decode_latents(latents), by_hand, atol=1e-5)
