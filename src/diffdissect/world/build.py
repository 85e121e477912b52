"""`diffdissect toy build`: train the shapes world's pipeline and classifiers from scratch, reproducibly.

The result is a weights directory (committed under diffdissect/world/weights, a few MB):

    build.json      diffdissect version, weights format, recipe, timings, held-out accuracies
    world.json      the world config (factors, planted rates)
    pipeline/       the text-to-image pipeline (stock diffusers format, save_pretrained)
    cnn/ vit/ captioner/   classifiers: model.safetensors + config.json

The build writes into a temporary sibling directory and swaps it in only when everything succeeded,
so a failed or interrupted build never damages existing weights.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from diffdissect.errors import DiffdissectError
from diffdissect.runtime import version
from diffdissect.world.classifiers import (
    AttributeCaptioner,
    ShapesCNN,
    ShapesViT,
    class_accuracy,
    class_names,
    factor_accuracy,
    save_classifier,
    train_classifier,
)
from diffdissect.world.generator import FACTORS, WorldConfig
from diffdissect.world.pipeline import PipelineConfig, build_pipeline

WEIGHTS_FORMAT = 1
DEFAULT_WEIGHTS = Path(__file__).parent / "weights"


@dataclass
class BuildConfig:
    seed: int = 0
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cnn_steps: int = 600
    vit_steps: int = 1200
    captioner_steps: int = 600
    threads: int | None = None

    def scaled(self, factor: float) -> BuildConfig:
        return BuildConfig(
            seed=self.seed,
            pipeline=self.pipeline.scaled(factor),
            threads=self.threads,
            cnn_steps=max(2, int(self.cnn_steps * factor)),
            vit_steps=max(2, int(self.vit_steps * factor)),
            captioner_steps=max(2, int(self.captioner_steps * factor)),
        )


def build_toy(
    out: str | Path = DEFAULT_WEIGHTS,
    recipe: BuildConfig | None = None,
    world: WorldConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train everything and write the weights directory `out` (atomically replaced). Returns build.json."""
    recipe, world = recipe or BuildConfig(), world or WorldConfig()
    recipe = replace(recipe, pipeline=replace(recipe.pipeline, seed=recipe.seed))  # never mutate the caller's
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    out = Path(out)
    staging = out.with_name(f".{out.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    timings: dict[str, float] = {}
    metrics: dict[str, Any] = {}

    def timed(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 1)
        return value

    (staging / "world.json").write_text(json.dumps(world.to_json(), indent=2))
    pipe, metrics["pipeline"] = timed("pipeline", build_pipeline, recipe.pipeline, world, progress=progress)
    pipe.save_pretrained(staging / "pipeline", safe_serialization=True)
    names = class_names(world)
    factor_sizes = {f: len(world.values(f)) for f in FACTORS}
    jobs = [
        ("cnn", lambda: ShapesCNN(len(names)), recipe.cnn_steps, 1),
        ("vit", lambda: ShapesViT(len(names)), recipe.vit_steps, 2),
        ("captioner", lambda: AttributeCaptioner(factor_sizes), recipe.captioner_steps, 3),
    ]
    for name, make, steps, offset in jobs:
        torch.manual_seed(recipe.seed * 10 + offset)
        model = make()
        timed(
            name,
            train_classifier,
            model,
            world,
            steps=steps,
            seed=recipe.seed * 10 + offset,
            progress=progress,
            desc=name,
            lr=1e-3 if name == "vit" else 2e-3,
        )
        extra = {"labels": names} if name != "captioner" else {"factor_values": {f: world.values(f) for f in FACTORS}}
        save_classifier(model, staging / name, extra)
        metrics[name] = (
            factor_accuracy(model, world)
            if isinstance(model, AttributeCaptioner)
            else {"class_accuracy": class_accuracy(model, world)}
        )
    info = {
        "weights_format": WEIGHTS_FORMAT,
        "diffdissect_version": _version(),
        "recipe": asdict(recipe),
        "timings_s": timings,
        "metrics": metrics,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    (staging / "build.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
    return info


def _version() -> str:
    return version()


# ---- loading the committed weights ----------------------------------------------------------------
def check_weights(directory: str | Path | None = None) -> Path:
    """The weights directory, after checking it exists and was built in a format this version reads."""
    directory = Path(directory) if directory is not None else DEFAULT_WEIGHTS
    info_path = directory / "build.json"
    rebuild = (
        "Rebuild with `diffdissect toy build" + ("" if directory == DEFAULT_WEIGHTS else f" --out {directory}") + "`."
    )
    if not info_path.is_file():
        raise DiffdissectError(f"no shapes-world weights at {directory} (build.json missing). {rebuild}")
    info = json.loads(info_path.read_text())
    if info.get("weights_format") != WEIGHTS_FORMAT:
        raise DiffdissectError(
            f"the shapes-world weights at {directory} are format {info.get('weights_format')!r} "
            f"(built by diffdissect {info.get('diffdissect_version')}); this version reads format "
            f"{WEIGHTS_FORMAT}. {rebuild}"
        )
    for part in (
        "pipeline/model_index.json",
        "world.json",
        "cnn/config.json",
        "vit/config.json",
        "captioner/config.json",
    ):
        if not (directory / part).is_file():
            raise DiffdissectError(
                f"the shapes-world weights at {directory} are incomplete ({part} missing). {rebuild}"
            )
    return directory
