"""`diffdissect bench datapath`: the store-to-batch data path against a raw read of the same bytes, side by side.

A synthetic store (spatial float16 maps, `rows` x d x h x w, shards of `shard_rows`) is written once into a
temporary directory and read once to warm the page cache. Then, in interleaved rounds with the order
rotated, each reader goes over the whole slice and its rate is the slice's stored bytes per second:

- raw: `readinto` of each shard's slice bytes into one preallocated buffer (no parsing, no copy after);
- stream f32: the SAE's token stream (`MixingStream`, tokens, float32, mixing pools of 4 shards, prefetch);
- stream stored: the same in the stored dtype (what an accelerator is sent; it converts there);
- rows stream f32: the same over a store of token-major rows (d only; no layout change);
- reader in order / reader shuffled: `StoreReader.iter_batches` in order, and shuffled across shards
  (`mix_shards=4`), batches of 256 rows, stored dtype.

SAE from the store vs from memory: the same SAE steps (sae_loss + apply_update) fed by the token stream
(prefetch thread) or by draws from a preloaded float32 tensor, alternating step by step (so load drift
hits both alike); tokens/s per round, medians over rounds.

`sae features` memory: peak RSS of a fresh process running `analyse_features` on held-out sets of n and 4n
images (an SAE checkpoint written without training; the streaming pass does not care).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffdissect.sae.model import SAEConfig, TopKSAE
from diffdissect.sae.train import apply_update, sae_loss
from diffdissect.store import open_store
from diffdissect.store.from_arrays import write_array_store
from diffdissect.store.manifest import SHARDS_DIR, slice_key
from diffdissect.store.stream import MixingStream

LAYER, T = "blk", 10


def load() -> float:
    return os.getloadavg()[0]


def write_store(path: Path, rows: int, d: int, hw: int, shard_rows: int, seed: int = 0) -> Path:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (rows, d, hw, hw) if hw else (rows, d)
    x = torch.randn(*shape, generator=gen, device="cpu").to(torch.float16)
    write_array_store(
        path,
        {(LAYER, T): x},
        [{"input_id": f"img{i}", "label": str(i % 4)} for i in range(rows)],
        shard_rows=shard_rows,
        dtype="float16",
    )
    return path


def raw_reader(store: Path) -> Callable[[], int]:
    """Reads each shard's slice bytes with one readinto into a reused buffer; returns the bytes read."""
    reader = open_store(store)
    spans = []
    for shard in reader.manifest.shards:
        path = store / SHARDS_DIR / shard.name
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            entry = json.loads(fh.read(length))[slice_key(LAYER, T)]
        begin, end = (8 + length + int(o) for o in entry["data_offsets"])
        spans.append((path, begin, end))
    buffer = bytearray(max(end - begin for _, begin, end in spans))

    def run() -> int:
        total = 0
        for path, begin, end in spans:
            with open(path, "rb", buffering=0) as fh:
                fh.seek(begin)
                view = memoryview(buffer)[: end - begin]
                while len(view):
                    got = fh.readinto(view)
                    view = view[got:]
                total += end - begin
        return total

    return run


def stream_reader(
    store: Path, dtype: torch.dtype | None, tokens: bool, batch: int = 4096, device: str = "cpu"
) -> Callable[[], int]:
    """The steady state of a long-lived stream (as in SAE training): each call takes one epoch's batches.
    With device="meta" this is the host side of the accelerator feed: the selected rows copied in their stored
    dtype and layout into the staging buffer (pinned on CUDA); the move, layout change and gathers are free."""
    reader = open_store(store)
    shape = reader.shape(LAYER)
    nbytes = reader.num_rows * int(np.prod(shape)) * 2
    items = reader.num_rows * (int(np.prod(shape[1:])) if tokens else 1)
    stream = MixingStream(reader, LAYER, T, batch, tokens=tokens, dtype=dtype, mix_shards=4, epochs=None, device=device)

    def run() -> int:
        for _ in range(items // batch):
            next(stream)
        return items // batch * batch * nbytes // items

    return run


def plain_reader(store: Path, shuffle: bool, batch: int = 64) -> Callable[[], int]:
    reader = open_store(store)
    nbytes = reader.num_rows * int(np.prod(reader.shape(LAYER))) * 2

    def run() -> int:
        for _ in reader.iter_batches(LAYER, T, batch, shuffle=shuffle, mix_shards=4, format="torch"):
            pass
        return nbytes

    return run


def side_by_side(runners: dict[str, Callable[[], int]], rounds: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {name: [] for name in runners}
    loads = []
    for run in runners.values():  # warm-up (and the page cache)
        run()
    for r in range(rounds):
        names = list(runners)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            start = time.perf_counter()
            nbytes = runners[name]()
            rates[name].append(nbytes / (time.perf_counter() - start))
        loads.append(round(load(), 2))
    medians = {name: statistics.median(v) for name, v in rates.items()}
    return {
        "bytes_per_s": medians,
        "ratio_to_raw": {n: medians[n] / medians["raw"] for n in medians},
        "all_rounds": rates,
        "load_1min_per_round": loads,
    }


def sae_from_store_vs_memory(
    store: Path, *, n_latents: int, k: int, batch: int, steps: int, rounds: int
) -> dict[str, Any]:
    reader = open_store(store)
    d = reader.shape(LAYER)[0]
    memory = torch.from_numpy(reader.load(LAYER, T)).float()
    memory = memory.flatten(2).transpose(1, 2).reshape(-1, d).contiguous() if memory.dim() > 2 else memory
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sae = TopKSAE(SAEConfig(d_in=d, n_latents=n_latents, k=k), device="cpu")
    sae.initialise_from(memory[:8192])
    optimiser = torch.optim.Adam(sae.parameters(), lr=1e-4)
    stream = MixingStream(reader, LAYER, T, batch, tokens=True, dtype=torch.float32, mix_shards=4, epochs=None)
    order = torch.randperm(len(memory), generator=torch.Generator(device="cpu").manual_seed(0), device="cpu")
    position = [0]

    def from_memory() -> torch.Tensor:
        if position[0] + batch > len(memory):
            position[0] = 0
        x = memory.index_select(0, order[position[0] : position[0] + batch])
        position[0] += batch
        return x

    def step(next_batch: Callable[[], torch.Tensor]) -> float:
        start = time.perf_counter()
        x = next_batch()
        if not torch.isfinite(x).all():
            raise RuntimeError("non-finite batch")
        loss, *_ = sae_loss(sae, x, None, 0.0)
        apply_update(sae, optimiser, loss)
        return time.perf_counter() - start

    feeds = {"memory": from_memory, "store": lambda: next(stream)}
    rates: dict[str, list[float]] = {"memory": [], "store": []}
    step(from_memory)
    step(feeds["store"])
    loads = []
    for _ in range(rounds):  # steps alternate between the feeds, so load drift hits both alike
        seconds = {"memory": 0.0, "store": 0.0}
        for i in range(steps):
            for name in ["memory", "store"] if i % 2 == 0 else ["store", "memory"]:
                seconds[name] += step(feeds[name])
        for name in rates:
            rates[name].append(steps * batch / seconds[name])
        loads.append(round(load(), 2))
    stream.close()
    medians = {n: statistics.median(v) for n, v in rates.items()}
    return {
        "tokens_per_s": medians,
        "ratio_store_to_memory": medians["store"] / medians["memory"],
        "all_rounds": rates,
        "load_1min_per_round": loads,
        "config": {"d_in": d, "n_latents": n_latents, "k": k, "batch": batch, "steps": steps},
    }


_FEATURES_CHILD = """
import json, resource, sys
from diffdissect.sae.features import analyse_features
results, acts, held = analyse_features(sys.argv[1])
peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024
print(json.dumps({"peak_mib": peak, "heldout": len(held)}))
"""


def features_memory(root: Path, *, heldout: int, d: int, hw: int, n_latents: int, k: int) -> dict[str, Any]:
    """Peak RSS of `analyse_features` on n and 4n held-out images (held-out fraction 0.5)."""
    from diffdissect.sae.checkpoint import save_checkpoint

    out = {}
    for n in (heldout, 4 * heldout):
        store = write_store(root / f"features-{n}", 2 * n, d, hw, shard_rows=64, seed=n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sae = TopKSAE(SAEConfig(d_in=d, n_latents=n_latents, k=k), device="cpu")
        info = {
            "slice": {"store": str(store), "layer": LAYER, "t": T, "d_in": d},
            "train": {"layer": LAYER, "t": T, "tokens": True, "heldout_fraction": 0.5},
        }
        save_checkpoint(root / f"sae-{n}", sae, info)
        child = subprocess.run(
            [sys.executable, "-c", _FEATURES_CHILD, str(root / f"sae-{n}")],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        out[n] = json.loads(child.stdout.strip().splitlines()[-1])
    small, large = out[heldout], out[4 * heldout]
    return {
        "peak_mib": {str(n): v["peak_mib"] for n, v in out.items()},
        "heldout_images": {str(n): v["heldout"] for n, v in out.items()},
        "growth": large["peak_mib"] / small["peak_mib"] - 1,
        "config": {"d_in": d, "map": [hw, hw], "n_latents": n_latents, "k": k},
    }


def run_datapath_benchmark(
    *,
    rows: int = 1024,
    d: int = 1280,
    hw: int = 8,
    shard_rows: int = 64,
    rounds: int = 3,
    sae_steps: int = 6,
    sae_batch: int = 1024,
    sae_expansion: int = 4,
    features: bool = True,
    threads: int = 1,
    directory: str | None = None,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        root = Path(tmp)
        spatial = write_store(root / "spatial", rows, d, hw, shard_rows)
        token_rows = write_store(root / "rows", rows * hw * hw, d, 0, shard_rows * hw * hw)
        result: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores, {platform.machine()}",
            "torch": torch.__version__,
            "threads": threads,
            "load_1min_start": round(load(), 2),
            "store": {
                "rows": rows,
                "d": d,
                "map": [hw, hw],
                "dtype": "float16",
                "shard_rows": shard_rows,
                "mib": round(rows * d * hw * hw * 2 / 2**20, 1),
            },
        }
        result["read"] = side_by_side(
            {
                "raw": raw_reader(spatial),
                "stream_f32": stream_reader(spatial, torch.float32, True),
                "stream_stored": stream_reader(spatial, None, True),
                "stream_accelerator_host": stream_reader(spatial, torch.float32, True, device="meta"),
                "reader_in_order": plain_reader(spatial, False),
                "reader_shuffled": plain_reader(spatial, True),
            },
            rounds,
        )
        result["read_token_rows"] = side_by_side(
            {
                "raw": raw_reader(token_rows),
                "stream_f32": stream_reader(token_rows, torch.float32, False),
                "stream_stored": stream_reader(token_rows, None, False),
                "stream_accelerator_host": stream_reader(token_rows, torch.float32, False, device="meta"),
            },
            rounds,
        )
        result["sae"] = sae_from_store_vs_memory(
            spatial, n_latents=sae_expansion * d, k=32, batch=sae_batch, steps=sae_steps, rounds=rounds
        )
        if features:
            result["features_memory"] = features_memory(root, heldout=64, d=256, hw=16, n_latents=4096, k=32)
        result["load_1min_end"] = round(load(), 2)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ratios = result["read"]["ratio_to_raw"]
    result["pass"] = {
        "stream_f32 >= 0.8x raw": ratios["stream_f32"] >= 0.8,
        "reader_shuffled >= 0.6x raw": ratios["reader_shuffled"] >= 0.6,
        "sae store >= 0.97x memory": result["sae"]["ratio_store_to_memory"] >= 0.97,
    }
    if features:
        result["pass"]["features peak growth < 10% at 4x held-out"] = result["features_memory"]["growth"] < 0.10
    return result


def print_table(result: dict[str, Any]) -> None:
    for section in ("read", "read_token_rows"):
        print(f"{section}: (load per round {result[section]['load_1min_per_round']})")
        for name, rate in result[section]["bytes_per_s"].items():
            print(f"  {name:18s} {rate / 1e9:7.2f} GB/s   {result[section]['ratio_to_raw'][name]:.3f}x raw")
    sae = result["sae"]
    print(
        f"sae: store {sae['tokens_per_s']['store']:,.0f} tokens/s, memory {sae['tokens_per_s']['memory']:,.0f} "
        f"tokens/s: {sae['ratio_store_to_memory']:.3f}x (load {sae['load_1min_per_round']})"
    )
    if "features_memory" in result:
        fm = result["features_memory"]
        print(f"sae features peak RSS: {fm['peak_mib']} MiB, growth {100 * fm['growth']:.1f}% at 4x held-out")
    for name, ok in result["pass"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
