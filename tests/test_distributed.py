"""Scale-out (issue 8), run for real on CPU: 2 processes on the gloo backend, through torchrun (the CLI) and
torch.multiprocessing spawn (the library), compared with a single process. A rank killed mid-capture loses
and duplicates nothing once the job is restarted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from diffdissect.capture import CaptureConfig, capture
from diffdissect.data import FolderSource
from diffdissect.models import load_target
from diffdissect.store import open_store, verify_store
from diffdissect.store.from_arrays import write_array_store

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is needed",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)


def _shards(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store / "shards").glob("*.safetensors"))}


def _assert_same_store(a: Path, b: Path) -> None:
    assert _shards(a) == _shards(b) and len(_shards(a)) > 1
    assert (a / "index.csv").read_text() == (b / "index.csv").read_text()
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["shards"] == mb["shards"] and ma["complete"] and mb["complete"]
    assert verify_store(a).ok
    assert not (a / "ranks").exists() or not any((a / "ranks").iterdir())  # every list merged


SPEC = dict(
    layers=["mid_block", "up_blocks.1"], timesteps=[50, 500], seeds=[0, 1], batch_size=2, shard_size=1, dtype="float32"
)


# ---- capture through torchrun (the CLI a user runs) ------------------------------------------------------------------
def test_torchrun_capture_equals_a_single_process_capture(tmp_path, sd_dir, image_folder):
    single = tmp_path / "single"
    capture(load_target(sd_dir), FolderSource(image_folder), CaptureConfig(**SPEC), single, progress=False)
    dist = tmp_path / "dist"
    args = [
        "capture",
        "--model",
        str(sd_dir),
        "--images",
        str(image_folder),
        "--layers",
        *SPEC["layers"],
        "--timesteps",
        "50",
        "500",
        "--seeds",
        "0",
        "1",
        "--batch-size",
        "2",
        "--shard-size",
        "1",
        "--dtype",
        "float32",
        "--out",
        str(dist),
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "diffdissect",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with 2 ranks" in result.stdout and result.stdout.count("wrote ") == 1  # rank 0 reports, once
    _assert_same_store(dist, single)


# ---- a rank killed mid-capture, then the job restarted (spawn) ------------------------------------------------------
def _capture_worker(rank: int, world: int, port: int, sd_dir: str, folder: str, out: str, die_after: int) -> None:
    _join(rank, world, port)
    from diffdissect.distributed import from_env
    from diffdissect.store import writer as store_writer

    if die_after and rank == 1:
        original = store_writer.StoreWriter.write_shard
        written = []

        def write_then_die(self, *a, **k):
            record = original(self, *a, **k)
            written.append(record)
            if len(written) >= die_after:
                os._exit(17)  # killed: no clean-up, no barrier, no manifest merge
            return record

        store_writer.StoreWriter.write_shard = write_then_die
    capture(load_target(sd_dir), FolderSource(folder), CaptureConfig(**SPEC), out, progress=False, dist=from_env())
    torch.distributed.destroy_process_group()


def _single_and_killed(tmp_path, sd_dir, image_folder, die_after: int) -> tuple[Path, Path]:
    """A single-process capture, and a 2-rank capture whose rank 1 dies after `die_after` shards."""
    single = tmp_path / "single"
    capture(load_target(sd_dir), FolderSource(image_folder), CaptureConfig(**SPEC), single, progress=False)
    out = tmp_path / "dist"
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        mp.spawn(_capture_worker, args=(2, _free_port(), str(sd_dir), str(image_folder), str(out), die_after), nprocs=2)
    return single, out


def test_a_killed_rank_loses_and_duplicates_nothing_after_a_restart(tmp_path, sd_dir, image_folder):
    single, out = _single_and_killed(tmp_path, sd_dir, image_folder, die_after=1)
    listed = json.loads((out / "manifest.json").read_text())
    assert not listed["complete"]
    rank_files = list((out / "ranks").glob("rank-*.json"))
    assert rank_files  # the dead rank's committed shard is recorded
    mp.spawn(_capture_worker, args=(2, _free_port(), str(sd_dir), str(image_folder), str(out), 0), nprocs=2)
    _assert_same_store(out, single)
    rows = open_store(out).rows()
    keys = [(r["input_id"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(open_store(single).rows())


def test_a_single_process_resumes_what_ranks_left(tmp_path, sd_dir, image_folder):
    """An interrupted distributed capture can be finished by one process (the ranks' lists are merged)."""
    single, out = _single_and_killed(tmp_path, sd_dir, image_folder, die_after=2)
    capture(load_target(sd_dir), FolderSource(image_folder), CaptureConfig(**SPEC), out, progress=False)
    _assert_same_store(out, single)


# ---- SAE training with data parallelism (spawn) --------------------------------------------------------------------
def _sae_store(path: Path) -> None:
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(64, 16)).astype(np.float32)
    codes = (rng.random((1200, 64)) < 0.06) * rng.random((1200, 64)) * 3
    x = (codes @ atoms + 0.05 * rng.normal(size=(1200, 16))).astype(np.float32)
    write_array_store(path, {("layer", 0): x}, [{"input_id": f"img{i:05d}"} for i in range(1200)])


def _sae_config():
    from diffdissect.sae import TrainConfig

    return TrainConfig(
        layer="layer",
        t=0,
        tokens=False,
        k=4,
        n_latents=64,
        expansion=None,
        batch_size=128,
        steps=300,
        lr=3e-3,
        checkpoint_every=100,
        seed=0,
    )


def _sae_worker(rank: int, world: int, port: int, store: str, out: str) -> None:
    _join(rank, world, port)
    from diffdissect.distributed import from_env
    from diffdissect.sae import train_sae

    summary = train_sae(store, _sae_config(), out, progress=False, dist=from_env())
    from diffdissect.sae.checkpoint import load_sae

    sae, _ = load_sae(out)
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"fvu": summary["metrics"]["fvu"], "ranks": summary.get("ranks")})
    )
    torch.distributed.destroy_process_group()
    del sae


def test_data_parallel_sae_matches_single_process_training(tmp_path):
    from diffdissect.sae import train_sae

    store = tmp_path / "store"
    _sae_store(store)
    single = train_sae(store, _sae_config(), tmp_path / "single", progress=False)
    out = tmp_path / "ddp"
    mp.spawn(_sae_worker, args=(2, _free_port(), str(store), str(out)), nprocs=2)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["ranks"] == 2  # every rank ends with the same model
    fvu_single, fvu_ddp = single["metrics"]["fvu"], ranks[0]["fvu"]
    assert fvu_single < 0.5  # it learnt something
    assert abs(fvu_ddp - fvu_single) < 0.03 + 0.1 * fvu_single, (fvu_single, fvu_ddp)
    saved = json.loads((out / "config.json").read_text())
    assert saved["step"] == 300 and saved["resolved"]["batch_size"] == 128
