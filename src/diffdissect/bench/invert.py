"""`diffdissect bench invert`: inverter training steps/s with precomputed features vs FeatInv's way.

FeatInv computes the classifier's features (and the VAE latents) inside the data loader, for every
sample of every epoch. diffdissect computes both once into a store. Both variants train the same
inverter (shapes-world CNN, block2, spatial) with the same config and the same draws; each round runs
`steps` steps of each, alternating which goes first, and the median steps/s over rounds is compared.
The one-off cost of precomputing is reported beside it, with the break-even point in steps.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import torch

from diffdissect.invert.data import encode_batchwise
from diffdissect.invert.run import train_per_sample
from diffdissect.invert.train import InvertTrainConfig, train_inverter
from diffdissect.world.invert import TRAIN_SEED, world_extractor, world_images
from diffdissect.world.shapes import ShapesWorld


def bench_invert(
    *, images: int = 4096, steps: int = 40, rounds: int = 3, batch_size: int = 64, world: ShapesWorld | None = None
) -> dict[str, Any]:
    world = world or ShapesWorld.load()
    target = world.target()
    extractor = world_extractor(world, "cnn", "spatial")
    batch = world_images(world, images, TRAIN_SEED)
    started = time.perf_counter()
    latents, features = encode_batchwise(target, extractor, batch.images)
    feature_shape = cast(tuple[int, int, int], tuple(features.shape[1:]))
    precompute_s = time.perf_counter() - started
    info = {"classifier": "cnn", "layer": extractor.layer, "mode": "spatial"}
    rates: dict[str, list[float]] = {"precomputed": [], "per_sample": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = ["precomputed", "per_sample"] if r % 2 == 0 else ["per_sample", "precomputed"]
            for name in order:
                config = InvertTrainConfig(steps=steps, batch_size=batch_size, checkpoint_every=10**9, seed=r)
                out = Path(tmp) / f"{name}-{r}"
                if name == "precomputed":
                    summary = train_inverter(
                        target,
                        lambda idx: (latents[idx], features[idx]),
                        len(latents),
                        feature_shape,
                        config,
                        out,
                        info,
                        progress=False,
                    )
                else:
                    summary = train_per_sample(target, extractor, "cnn", batch.images, out, config)
                rates[name].append(summary["steps_per_s"])
    pre, per = statistics.median(rates["precomputed"]), statistics.median(rates["per_sample"])
    saved_per_step = 1 / per - 1 / pre
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "images": images,
        "steps_per_round": steps,
        "rounds": rounds,
        "batch_size": batch_size,
        "steps_per_s": {"precomputed": pre, "per_sample": per},
        "all_rounds": rates,
        "speedup": pre / per,
        "precompute_seconds": precompute_s,
        "break_even_steps": precompute_s / saved_per_step if saved_per_step > 0 else None,
    }
