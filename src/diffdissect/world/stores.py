"""Captures of held-out shapes-world images through the toy pipeline (the demo's and benchmarks' inputs)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from diffdissect.capture import CaptureSpec, capture
from diffdissect.data import ArraySource
from diffdissect.models import Target, load_target
from diffdissect.store import Manifest
from diffdissect.world.build import check_weights, load_world, pipeline_dir
from diffdissect.world.generator import FACTORS, sample_world

HELD_OUT_SEED = 123_456_789          # no build step draws from this seed


def world_source(images: int, *, weights: Path | None = None, seed: int = HELD_OUT_SEED):
    """(ArraySource with every factor as an attribute and the shape as label, the world batch)."""
    world = load_world(check_weights(weights))
    batch = sample_world(images, seed=seed, config=world)
    attributes = {f: batch.labels(f) for f in FACTORS}
    return ArraySource(batch.images, labels=attributes["shape"], captions=batch.captions, attributes=attributes), batch


def world_target(*, random_init: bool = False, weights: Path | None = None) -> Target:
    """The toy pipeline as a capture target (or its random-init control)."""
    return load_target(str(pipeline_dir(check_weights(weights))), random_init=random_init)


def capture_world(out: str | Path, images: int, layers: Sequence[str], timesteps: Sequence[int], *,
                  pooling: str = "mean", random_init: bool = False, weights: Path | None = None,
                  batch_size: int = 128, replace: bool = True, progress: bool = False,
                  target: Target | None = None, source: ArraySource | None = None) -> Manifest:
    """Capture `images` held-out world images (empty prompt, noise seed 0) from the toy pipeline.

    `replace=True` removes an earlier store at `out` first (it may come from other weights). Pass
    `target` to capture through an already loaded (e.g. instrumented) toy pipeline, and `source` (from
    `world_source(images)`) to reuse images already rendered.
    """
    weights = check_weights(weights)
    if source is None:
        source, _ = world_source(images, weights=weights)
    out = Path(out)
    if replace and (out / "manifest.json").is_file():
        shutil.rmtree(out)
    target = target or world_target(random_init=random_init, weights=weights)
    spec = CaptureSpec(layers=list(layers), timesteps=list(timesteps), seeds=[0], batch_size=batch_size,
                       pooling=pooling, dtype="float32")
    return capture(target, source, spec, out, progress=progress)
