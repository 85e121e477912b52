"""`diffdissect bench distributed`: capture throughput with 2 ranks x 1 thread vs 1 rank x 1 thread.

Both variants run the real thing: `torchrun --nproc_per_node R -m diffdissect.bench.distributed --worker`
on the gloo backend, capturing held-out shapes-world images through the committed toy pipeline (every
UNet level, several timesteps: compute-bound on CPU). Throughput is images / capture time of the large run,
timed inside the ranks (process start-up, imports and model loading excluded); the marginal throughput
(N2 - N1) / (T2 - T1) over the two image counts is reported beside it. Each rank reports its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LAYERS = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
TIMESTEPS = [50, 250, 500, 750]


def _worker(args: argparse.Namespace) -> None:
    import torch

    from diffdissect.capture import CaptureConfig, capture
    from diffdissect.distributed import from_env
    from diffdissect.world.shapes import ShapesWorld

    torch.set_num_threads(1)
    dist = from_env()
    world = ShapesWorld.load()
    source, _ = world.source(args.images)
    spec = CaptureConfig(layers=LAYERS, timesteps=TIMESTEPS, seeds=[0], batch_size=32, shard_size=64, pooling="mean")
    started = time.perf_counter()
    capture(world.target(), source, spec, args.out, progress=False, dist=dist)
    elapsed = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.report, f"rank{dist.rank}.json").write_text(json.dumps({"seconds": elapsed, "peak_rss_mb": peak_mb}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(ranks: int, images: int, tmp: Path) -> dict[str, Any]:
    out, report = tmp / f"store-{ranks}-{images}", tmp / f"report-{ranks}-{images}"
    shutil.rmtree(out, ignore_errors=True)
    report.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(_free_port()),
            "-m",
            "diffdissect.bench.distributed",
            "--worker",
            "--images",
            str(images),
            "--out",
            str(out),
            "--report",
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the {ranks}-rank capture failed:\n{result.stderr[-3000:]}")
    wall = time.perf_counter() - started
    per_rank = [json.loads(p.read_text()) for p in sorted(report.glob("rank*.json"))]
    return {
        "wall_s": wall,
        "capture_s": max(r["seconds"] for r in per_rank),
        "peak_rss_mb": [r["peak_rss_mb"] for r in per_rank],
    }


def bench_distributed(small: int = 512, large: int = 3072) -> dict[str, Any]:
    import datetime
    import platform

    with tempfile.TemporaryDirectory() as tmp:
        runs = {r: {n: _run(r, n, Path(tmp)) for n in (small, large)} for r in (1, 2)}
    throughput = {r: large / runs[r][large]["capture_s"] for r in runs}
    marginal = {r: (large - small) / (runs[r][large]["capture_s"] - runs[r][small]["capture_s"]) for r in runs}
    single_peak = max(runs[1][large]["peak_rss_mb"])
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "layers": LAYERS,
        "timesteps": TIMESTEPS,
        "images": [small, large],
        "runs": runs,
        "images_per_s": throughput,
        "scaling_2_vs_1": throughput[2] / throughput[1],
        "marginal_images_per_s": marginal,
        "marginal_scaling_2_vs_1": marginal[2] / marginal[1],
        "peak_rss_ratio_per_rank": [p / single_peak for p in runs[2][large]["peak_rss_mb"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out")
    parser.add_argument("--report")
    args = parser.parse_args()
    if args.worker:
        _worker(args)


if __name__ == "__main__":
    main()
