"""The shapes world as one object: its weights directory, checked and read once, and what it offers.

`ShapesWorld.load(directory)` checks the weights directory (format, completeness) a single time and reads
world.json; everything else asks the object: the toy pipeline as a capture target, its classifiers and
captioner, its committed inverters, held-out image sources and captures of them (the demo's and the
benchmarks' inputs). Analyses never see this object; they get what it hands out (a module, a captioner,
a target, a store).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffdissect.capture import CaptureConfig, capture
from diffdissect.data import ArraySource
from diffdissect.models import Target, load_target
from diffdissect.store import Manifest
from diffdissect.world.build import DEFAULT_WEIGHTS, check_weights
from diffdissect.world.captioner import WorldCaptioner
from diffdissect.world.classifiers import load_classifier
from diffdissect.world.generator import FACTORS, WorldBatch, WorldConfig, sample_world

HELD_OUT_SEED = 123_456_789  # no build step draws from this seed
CLASSIFIERS = ("cnn", "vit", "captioner")


@dataclass(frozen=True)
class ShapesWorld:
    """A checked shapes-world weights directory and its world config."""

    directory: Path
    config: WorldConfig

    @classmethod
    def load(cls, directory: str | Path | None = None) -> ShapesWorld:
        """Check the weights directory (default: the committed one) once and read its world config."""
        directory = check_weights(directory)
        return cls(directory, WorldConfig.load(directory / "world.json"))

    @property
    def is_default(self) -> bool:
        return self.directory == DEFAULT_WEIGHTS

    @property
    def pipeline_dir(self) -> Path:
        return self.directory / "pipeline"

    def pipeline(self):
        """The trained toy pipeline, through stock `diffusers.DiffusionPipeline.from_pretrained`."""
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(self.pipeline_dir)

    def target(self, *, random_init: bool = False) -> Target:
        """The toy pipeline as a capture target (or its random-init control)."""
        return load_target(str(self.pipeline_dir), random_init=random_init)

    def classifier(self, name: str) -> Any:
        """One of the world's classifiers, an nn.Module: 'cnn' and 'vit' (ShapesCNN, ShapesViT) or 'captioner'
        (the AttributeCaptioner network)."""
        if name not in CLASSIFIERS:
            from diffdissect.errors import DiffdissectError

            raise DiffdissectError(f"unknown toy classifier {name!r}; choose cnn, vit or captioner.")
        return load_classifier(self.directory / name)

    def captioner(self) -> WorldCaptioner:
        """The attribute captioner writing the world's full caption (an independent network)."""
        return WorldCaptioner(self.config, self.classifier("captioner"))

    def inverter_dir(self, classifier: str, mode: str) -> Path:
        return self.directory / "inverters" / f"{classifier}-{mode}"

    def images(self, n: int, seed: int = HELD_OUT_SEED) -> WorldBatch:
        return sample_world(n, seed=seed, config=self.config)

    def source(self, images: int, *, seed: int = HELD_OUT_SEED) -> tuple[ArraySource, WorldBatch]:
        """(ArraySource with every factor as an attribute and the shape as label, the world batch)."""
        batch = self.images(images, seed)
        attributes: dict[str, Sequence[Any]] = {f: batch.labels(f) for f in FACTORS}
        return ArraySource(
            batch.images, labels=attributes["shape"], captions=batch.captions, attributes=attributes
        ), batch

    def capture(
        self,
        out: str | Path,
        images: int,
        layers: Sequence[str],
        timesteps: Sequence[int],
        *,
        pooling: Literal["mean", "none"] = "mean",
        random_init: bool = False,
        batch_size: int = 128,
        replace: bool = True,
        progress: bool = False,
        target: Target | None = None,
        source: ArraySource | None = None,
    ) -> Manifest:
        """Capture `images` held-out world images (empty prompt, noise seed 0) from the toy pipeline.

        `replace=True` removes an earlier store at `out` first (it may come from other weights). Pass
        `target` to capture through an already loaded (e.g. instrumented) toy pipeline, and `source` (from
        `source(images)`) to reuse images already rendered.
        """
        if source is None:
            source, _ = self.source(images)
        out = Path(out)
        if replace and (out / "manifest.json").is_file():
            shutil.rmtree(out)
        target = target or self.target(random_init=random_init)
        spec = CaptureConfig(
            layers=list(layers),
            timesteps=list(timesteps),
            seeds=[0],
            batch_size=batch_size,
            pooling=pooling,
            dtype="float32",
        )
        return capture(target, source, spec, out, progress=progress)
