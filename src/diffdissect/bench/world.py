"""`diffdissect bench world`: shapes-world generation throughput (target: >= 5,000 images/s on 2 cores)."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Any

import numpy as np

from diffdissect.world.generator import sample_world

TARGET_IMAGES_PER_S = 5000.0


def run_world_benchmark(images: int = 50_000, repeats: int = 5, batch: int = 10_000) -> dict[str, Any]:
    """Median images/s of `sample_world` (images, factors and captions) over `repeats` runs."""
    sample_world(batch, seed=0)  # warm-up
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(0, images, batch):
            sample_world(min(batch, images - i), seed=1000 * r + i)
        rates.append(images / (time.perf_counter() - start))
    median = statistics.median(rates)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "numpy": np.__version__,
        "images": images,
        "batch": batch,
        "repeats": repeats,
        "images_per_s_median": round(median),
        "images_per_s_all": [round(x) for x in rates],
        "target": TARGET_IMAGES_PER_S,
        "pass": median >= TARGET_IMAGES_PER_S,
    }
    print(
        f"shapes world: {median:,.0f} images/s (median of {repeats}; target >= {TARGET_IMAGES_PER_S:,.0f}) "
        f"-> {'PASS' if result['pass'] else 'FAIL'}"
    )
    return result
