"""Orchestration: train an inverter from images (features precomputed once), sample, and evaluate.

`train_from_images` writes the training store (VAE latents + classifier features) under
`OUT/data` once and trains from it; `train_per_sample` is FeatInv's way (the classifier and the VAE
run on every batch), kept for the side-by-side cost benchmark.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffdissect.data.transforms import pixels_to_uint8
from diffdissect.errors import DiffdissectError
from diffdissect.invert.data import FEATURES, LATENT, images_to_pixels, prepare_inversion_data
from diffdissect.invert.features import FeatureExtractor
from diffdissect.invert.train import InvertTrainConfig, train_inverter
from diffdissect.models.target import Target
from diffdissect.runtime import load_factory
from diffdissect.store import open_store


def _info(extractor: FeatureExtractor, classifier_name: str) -> dict[str, Any]:
    return {"classifier": classifier_name, "layer": extractor.layer, "mode": extractor.mode}


def train_from_images(
    target: Target,
    extractor: FeatureExtractor,
    classifier_name: str,
    images: np.ndarray,
    out: str | Path,
    config: InvertTrainConfig,
    *,
    attributes: dict[str, Sequence[Any]] | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    out = Path(out)
    data_dir = Path(data_dir) if data_dir is not None else out / "data"
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    if (data_dir / "manifest.json").is_file():
        store = open_store(data_dir)
        model = store.manifest.model
        if (
            model.get("images_sha256") != digest
            or model.get("classifier") != classifier_name
            or model.get("weights_fingerprint") != target.identity()["weights_fingerprint"]
            or model.get("classifier_layer") != extractor.layer
            or model.get("feature_mode") != extractor.mode
        ):
            raise DiffdissectError(
                f"{data_dir} holds training data for other images, another pipeline or another "
                "classifier layer; use a new --out."
            )
    else:
        store = prepare_inversion_data(
            data_dir,
            target,
            extractor,
            images,
            attributes,
            progress=progress,
            extra={"images_sha256": digest, "classifier": classifier_name},
        )
    latents = store.load(LATENT, 0, format="torch", dtype="float32")
    features = store.load(FEATURES, 0, format="torch", dtype="float32")
    summary = train_inverter(
        target,
        lambda idx: (latents[idx], features[idx]),
        len(latents),
        tuple(features.shape[1:]),
        config,
        out,
        _info(extractor, classifier_name),
        progress=progress,
    )
    return {**summary, "examples": len(latents), "feature_shape": list(features.shape[1:])}


def train_per_sample(
    target: Target,
    extractor: FeatureExtractor,
    classifier_name: str,
    images: np.ndarray,
    out: str | Path,
    config: InvertTrainConfig,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """The baseline: VAE and classifier run on every training batch, as FeatInv's data loader does."""
    pixels = images_to_pixels(images)

    def batch_of(idx: torch.Tensor):
        x = pixels[idx]
        return target.encode_images(x).float(), extractor(x)

    with torch.no_grad():
        shape = tuple(extractor(pixels[:1]).shape[1:])
    return train_inverter(
        target, batch_of, len(pixels), shape, config, out, _info(extractor, classifier_name), progress=progress
    )


def load_classifier_spec(spec: str) -> tuple[torch.nn.Module, str]:
    """'package.module:factory' (a callable returning a module). The shapes world's 'world:cnn' / 'world:vit'
    are resolved by `diffdissect.world.invert.classifier_spec`, which falls back to this."""
    if ":" not in spec:
        raise DiffdissectError(f"--classifier {spec!r}: use world:cnn, world:vit or package.module:factory.")
    model = load_factory(spec, what="--classifier")
    if not isinstance(model, torch.nn.Module):
        raise DiffdissectError(f"--classifier {spec!r} returned {type(model).__name__}, not a torch nn.Module.")
    return model.eval().requires_grad_(False), spec


def folder_images(folder: str | Path, resolution: int, limit: int | None = None) -> np.ndarray:
    """A folder's readable images, resized and centre-cropped, as (N, R, R, 3) uint8."""
    from diffdissect.data import FolderSource
    from diffdissect.data.sources import UnreadableInput
    from diffdissect.data.transforms import to_model_pixels

    source = FolderSource(folder)
    out = []
    for i in range(len(source) if limit is None else min(limit, len(source))):
        try:
            pixels = to_model_pixels(source.load(i).image, resolution)
        except UnreadableInput:
            continue
        out.append(pixels_to_uint8(pixels[None])[0])
    if not out:
        raise DiffdissectError(f"no readable images in {folder}.")
    return np.stack(out)
