"""Training data for an inverter, computed once: VAE latents and classifier features in one store.

FeatInv computed the classifier's features inside the data loader, for every sample of every epoch.
Here each image is encoded by the VAE and the classifier once; training then reads both from the
activation store (slices `latent@t=0` and `features@t=0`, with the images' attributes as columns).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffdissect.data.transforms import uint8_to_pixels
from diffdissect.invert.features import FeatureExtractor
from diffdissect.models.target import Target
from diffdissect.store import open_store
from diffdissect.store.from_arrays import write_array_store

LATENT, FEATURES = "latent", "features"


def images_to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1]."""
    return uint8_to_pixels(images)


@torch.no_grad()
def encode_batchwise(
    target: Target, extractor: FeatureExtractor, images: np.ndarray, batch: int = 256, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    latents, features = [], []
    for start in tqdm(range(0, len(images), batch), desc="latents + features", disable=not progress):
        pixels = images_to_pixels(images[start : start + batch])
        latents.append(target.encode_images(pixels).float().cpu())
        features.append(extractor(pixels).cpu())
    return torch.cat(latents), torch.cat(features)


def prepare_inversion_data(
    out: str | Path,
    target: Target,
    extractor: FeatureExtractor,
    images: np.ndarray,
    attributes: dict[str, Sequence[Any]] | None = None,
    *,
    batch: int = 256,
    progress: bool = False,
    extra: dict[str, Any] | None = None,
):
    """Write the store an inverter trains from; returns its reader."""
    latents, features = encode_batchwise(target, extractor, images, batch, progress)
    rows = [{"input_id": f"img{i:07d}", **{k: v[i] for k, v in (attributes or {}).items()}} for i in range(len(images))]
    model = {**target.identity(), "classifier_layer": extractor.layer, "feature_mode": extractor.mode, **(extra or {})}
    write_array_store(out, {(LATENT, 0): latents, (FEATURES, 0): features}, rows, model=model)
    return open_store(out)
