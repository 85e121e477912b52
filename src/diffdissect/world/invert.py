"""FeatInv on the shapes world: data, the committed inverters, and the checks against the factors.

Classifiers and layers: the CNN's `block2` (64 x 8x8 maps) and the ViT's last block (`blocks.3`, 64 x
8x8 tokens after the CLS token is dropped). Training and evaluation images come from the colour-balanced
world (every shape in every colour), from seeds no other part of the build uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffdissect.invert.features import FeatureExtractor
from diffdissect.invert.run import load_classifier_spec
from diffdissect.world.classifiers import balanced_world
from diffdissect.world.generator import FACTORS, WorldBatch, sample_world
from diffdissect.world.shapes import ShapesWorld

WORLD_LAYERS = {"cnn": "block2", "vit": "blocks.3"}
WORLD_INVERTERS = (
    ("cnn", "spatial", 3000),
    ("cnn", "pooled", 2000),
    ("vit", "spatial", 3000),
)  # (classifier, mode, steps)
TRAIN_SEED = 71_000_000
EVAL_SEED = 72_000_000


def classifier_spec(spec: str, world: ShapesWorld | None = None) -> tuple[torch.nn.Module, str]:
    """A `--classifier` value: 'world:cnn' / 'world:vit' (the shapes world's; `world` default: the committed
    one), or 'package.module:factory' (a callable returning a module)."""
    if spec.startswith("world:"):
        model = (world or ShapesWorld.load()).classifier(spec.split(":", 1)[1])
        return model, spec
    return load_classifier_spec(spec)


def world_extractor(world: ShapesWorld, classifier: str, mode: str = "spatial") -> FeatureExtractor:
    if classifier not in WORLD_LAYERS:
        raise ValueError(f"the shapes world has classifiers {sorted(WORLD_LAYERS)}, not {classifier!r}.")
    return FeatureExtractor(world.classifier(classifier), WORLD_LAYERS[classifier], mode=mode)


def world_images(world: ShapesWorld, n: int, seed: int) -> WorldBatch:
    """Balanced-world images, their factor labels (names) and the CNN/ViT class index."""
    return sample_world(n, seed=seed, config=balanced_world(world.config))


def world_attributes(batch: WorldBatch) -> dict[str, Sequence[Any]]:
    return {f: batch.labels(f) for f in FACTORS}


def palette_and_background(world: ShapesWorld) -> tuple[np.ndarray, np.ndarray, list[str]]:
    config = world.config
    return (
        np.array(list(config.colours.values()), np.float32),
        np.array(config.background, np.float32),
        list(config.colours),
    )


# ---- evaluation on the world ------------------------------------------------------------------------
def evaluate_world(
    target,
    world: ShapesWorld,
    *,
    n: int = 256,
    seeds: tuple[int, ...] = (0, 1, 2),
    guidance: float = 3.0,
    steps: int = 20,
    classifiers: tuple[str, ...] = ("cnn", "vit"),
    applications: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Spatial and pooled inverters side by side, then steering, composites and robustness (CNN, spatial)."""
    import torch
    from tqdm.auto import tqdm

    from diffdissect.invert.data import images_to_pixels
    from diffdissect.invert.evaluate import evaluate_reconstructions, rate
    from diffdissect.invert.model import load_inverter
    from diffdissect.invert.sample import invert

    judge = world.classifier("captioner")
    batch = world_images(world, n, EVAL_SEED)
    pixels = images_to_pixels(batch.images)
    results: dict[str, Any] = {
        "n": n,
        "seeds": list(seeds),
        "guidance": guidance,
        "steps": steps,
        "reconstruction": {},
        "missing": [],
        "grids": {"originals": batch.images[:8]},
    }
    reference = world_images(world, n, EVAL_SEED + 1).images  # an independent real sample
    for clf in tqdm(classifiers, desc="inverters", disable=not progress):
        spatial = world_extractor(world, clf, "spatial")
        for mode in [m for c, m, _ in WORLD_INVERTERS if c == clf]:
            directory = world.inverter_dir(clf, mode)
            if not (directory / "config.json").is_file():
                results["missing"].append(f"{clf}-{mode}")
                continue
            inverter = load_inverter(directory, pipeline_identity=target.identity())
            with torch.no_grad():
                features = world_extractor(world, clf, mode)(pixels)
            recs = invert(target, inverter, features, seeds=seeds, guidance=guidance, steps=steps)
            metrics = evaluate_reconstructions(
                batch.images, recs[:, 0], classifier=spatial.model, extractor=spatial, judge=judge, reference=reference
            )
            reads = [judge.predict(images_to_pixels(recs[:, s])) for s in range(len(seeds))]
            original = judge.predict(pixels)
            metrics["factors_seed_spread"] = {
                f: float(np.std([(r[f] == original[f]).mean() for r in reads])) for f in FACTORS
            }
            disagree = np.zeros(n, bool)
            for f in FACTORS:
                stacked = np.stack([r[f] for r in reads])
                disagree |= (stacked != stacked[0]).any(0)
            metrics["inputs_whose_seeds_disagree"] = rate(disagree)
            metrics["training"] = _training_info(directory)
            results["reconstruction"][f"{clf}-{mode}"] = metrics
            results["grids"][f"{clf}-{mode}"] = recs[:8]
    if applications and (world.inverter_dir("cnn", "spatial") / "config.json").is_file():
        inverter = load_inverter(world.inverter_dir("cnn", "spatial"), pipeline_identity=target.identity())
        extractor = world_extractor(world, "cnn", "spatial")
        results["steering"] = _steering(target, inverter, extractor, judge, batch, guidance, steps)
        results["composites"] = _composites(target, inverter, extractor, batch, guidance, steps, world)
        results["robustness"] = _robustness(target, inverter, extractor, judge, batch, guidance, steps)
    return results


def _training_info(directory: Path) -> dict[str, Any]:
    import json

    path = directory / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _steering(
    target,
    inverter,
    extractor,
    judge,
    batch,
    guidance,
    steps,
    source: str = "red",
    goal: str = "blue",
    alphas: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0),
) -> dict[str, Any]:
    import torch

    from diffdissect.invert.applications import concept_direction, steer, steering_outcome
    from diffdissect.invert.data import images_to_pixels
    from diffdissect.invert.sample import invert

    colours = batch.config.values("colour")
    src, dst = colours.index(source), colours.index(goal)
    with torch.no_grad():
        features = extractor(images_to_pixels(batch.images))
    direction = concept_direction(features, batch.factors["colour"], src, dst)
    chosen = np.nonzero(batch.factors["colour"] == src)[0]
    if not len(chosen) or not (batch.factors["colour"] == dst).any():
        return {"skipped": f"no {source} or no {goal} images among the {len(batch)} evaluated; use more images."}
    before = {f: batch.factors[f][chosen] for f in FACTORS}
    out: dict[str, Any] = {
        "factor": "colour",
        "from": source,
        "to": goal,
        "n": int(len(chosen)),
        "alphas": {},
        "grids": {},
    }
    for alpha in alphas:
        recs = invert(
            target,
            inverter,
            steer(features[chosen], direction, alpha),
            guidance=guidance,
            steps=steps,
            ids=chosen.tolist(),
        )[:, 0]
        after = judge.predict(images_to_pixels(recs))
        out["alphas"][str(alpha)] = steering_outcome(before, after, "colour", dst)
        out["grids"][str(alpha)] = recs[:8]
    best = max(out["alphas"].items(), key=lambda kv: kv[1]["flipped_and_kept"]["rate"])
    out["best_alpha"] = float(best[0])
    out["originals"] = batch.images[chosen[:8]]
    return out


def _composites(target, inverter, extractor, batch, guidance, steps, world: ShapesWorld) -> dict[str, Any]:
    import torch

    from diffdissect.invert.applications import region_colour, splice
    from diffdissect.invert.data import images_to_pixels
    from diffdissect.invert.evaluate import rate
    from diffdissect.invert.sample import invert

    xpos, colour = batch.factors["xpos"], batch.factors["colour"]
    lefts, rights = np.nonzero(xpos == 0)[0], np.nonzero(xpos == 1)[0]
    pairs = [(i, j) for i, j in zip(lefts, rights) if colour[i] != colour[j]][:64]
    if not pairs:
        return {
            "skipped": f"no left/right pair of different colours among the {len(batch)} evaluated; use more images."
        }
    with torch.no_grad():
        features = extractor(images_to_pixels(batch.images))
    left = features[[i for i, _ in pairs]]
    right = features[[j for _, j in pairs]]
    recs = invert(target, inverter, splice(left, right), guidance=guidance, steps=steps)[:, 0]
    palette, background, _ = palette_and_background(world)
    got_left = region_colour(recs, palette, background, "left")
    got_right = region_colour(recs, palette, background, "right")
    want_left = np.array([colour[i] for i, _ in pairs])
    want_right = np.array([colour[j] for _, j in pairs])
    return {
        "pairs": len(pairs),
        "left_region_matches_left_source": rate(got_left == want_left),
        "right_region_matches_right_source": rate(got_right == want_right),
        "both_regions": rate((got_left == want_left) & (got_right == want_right)),
        "grids": {
            "left_sources": batch.images[[i for i, _ in pairs[:8]]],
            "right_sources": batch.images[[j for _, j in pairs[:8]]],
            "composites": recs[:8],
        },
    }


def _robustness(target, inverter, extractor, judge, batch, guidance, steps, n: int = 128) -> dict[str, Any]:
    import torch

    from diffdissect.invert.applications import CORRUPTIONS, classify, pgd, seen_versus_truth, to_uint8
    from diffdissect.invert.data import images_to_pixels
    from diffdissect.invert.evaluate import judge_joint_logits
    from diffdissect.invert.sample import invert
    from diffdissect.world.classifiers import class_labels

    images = batch.images[:n]
    truth = class_labels(batch.config, {f: v[:n] for f, v in batch.factors.items()})
    pixels = images_to_pixels(images)
    inputs = {name: fn(pixels) for name, fn in CORRUPTIONS.items()}
    inputs["pgd"] = pgd(extractor.model, pixels, torch.as_tensor(truth))
    out: dict[str, Any] = {"n": n, "cases": {}, "grids": {}}
    for name, corrupted in {"clean": pixels, **inputs}.items():
        corrupted_images = to_uint8(corrupted)
        predicted = classify(extractor.model, corrupted_images)
        with torch.no_grad():
            features = extractor(corrupted)
        recs = invert(target, inverter, features, guidance=guidance, steps=steps)[:, 0]
        with torch.no_grad():
            recon_class = judge_joint_logits(judge(images_to_pixels(recs))).argmax(1).numpy()
        out["cases"][name] = seen_versus_truth(predicted, recon_class, truth)
        out["grids"][name] = (corrupted_images[:8], recs[:8])
    return out


# ---- building the committed inverters ---------------------------------------------------------------


def build_world_inverters(
    target,
    world: ShapesWorld,
    *,
    images: int = 16384,
    batch_size: int = 64,
    lr: float = 1e-3,
    scale: float = 1.0,
    only: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the shapes world's inverters into `<weights directory>/inverters/` (each swapped in only when complete).

    Training data (latents + features of `images` balanced-world images) lives in a temporary directory
    and is removed afterwards; the committed directory holds the weights and config only."""
    import json
    import shutil
    import tempfile
    import time

    from diffdissect.invert.run import train_from_images
    from diffdissect.invert.train import InvertTrainConfig

    batch = world_images(world, images, TRAIN_SEED)
    summaries = {}
    for clf, mode, steps in WORLD_INVERTERS:
        name = f"{clf}-{mode}"
        if only and name not in only:
            continue
        final = world.inverter_dir(clf, mode)
        with tempfile.TemporaryDirectory(prefix="diffdissect-invert-") as tmp:
            staging = Path(tmp) / name
            started = time.perf_counter()
            config = InvertTrainConfig(
                steps=max(1, int(steps * scale)), batch_size=batch_size, lr=lr, checkpoint_every=500
            )
            summary = train_from_images(
                target,
                world_extractor(world, clf, mode),
                clf,
                batch.images,
                staging,
                config,
                attributes=world_attributes(batch),
                data_dir=Path(tmp) / "data",
                progress=progress,
            )
            summary["wall_seconds"] = time.perf_counter() - started
            (staging / "optimizer.safetensors").unlink(missing_ok=True)
            (staging / "training.json").write_text(json.dumps(summary, indent=1))
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(staging, final, ignore=shutil.ignore_patterns("previous", ".diffdissect.lock"))
        summaries[name] = summary
    return summaries


def strip_images(value: Any) -> Any:
    """The results as JSON: image grids and per-image arrays dropped, numpy scalars made Python."""
    if isinstance(value, dict):
        return {
            k: strip_images(v)
            for k, v in value.items()
            if k not in ("grids", "originals") and not k.endswith("_per_image")
        }
    if isinstance(value, (list, tuple)):
        return [strip_images(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim <= 1 and value.size <= 64 else None
    if isinstance(value, np.generic):
        return value.item()
    return value
