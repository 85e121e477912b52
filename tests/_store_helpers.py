"""Helpers for test_store.py, test_resume.py and test_bad_input.py.

Besides plain functions this module holds small `nn.Module` denoisers that a capture *subprocess* can
load as ``--model _store_helpers:<factory>`` (the tests put this folder on PYTHONPATH):

  slow_denoiser  TinyDenoiser that sleeps in forward (DD_TEST_SLEEP seconds) and, with
                 DD_TEST_HANG_AFTER=N, blocks forever in its (N+1)-th forward call, so a test can SIGKILL
                 it while a capture is certainly mid-way.
  probe_denoiser its layer `inp` is nn.Identity on the noised input: a mean-pooled row at t=0 is the
                 image's mean colour, so a row tells which image it came from.
  nan_denoiser   layer `bad` returns NaN for bright inputs (mean > 0.5), layer `good` is finite.
  huge_denoiser  layer `huge` returns values of 1e6 (beyond float16's 65504).

Every factory builds its weights under a fixed seed, so every process gets bit-identical models.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from diffdissect.lock import LOCK_NAME
from diffdissect.models.tiny import TinyDenoiser

TESTS_DIR = Path(__file__).resolve().parent
TINY_FACTORY = "diffdissect.models.tiny:tiny_denoiser"
SLEEP_ENV = "DD_TEST_SLEEP"
HANG_ENV = "DD_TEST_HANG_AFTER"


def _seeded(cls, seed: int = 0, **kwargs) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**kwargs).eval()


class SlowDenoiser(TinyDenoiser):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, sample, timestep):
        self.calls += 1
        hang_after = int(os.environ.get(HANG_ENV) or 0)
        if hang_after and self.calls > hang_after:
            while True:  # wait here to be killed
                time.sleep(0.05)
        time.sleep(float(os.environ.get(SLEEP_ENV) or 0))
        return super().forward(sample, timestep)


def slow_denoiser() -> SlowDenoiser:
    return _seeded(SlowDenoiser)


class ProbeDenoiser(nn.Module):
    in_channels, sample_size = 3, 8

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Identity()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mid = nn.Sequential(nn.SiLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.out = nn.Conv2d(4, 3, 1)

    def forward(self, sample, timestep):
        return self.out(self.mid(self.conv(self.inp(sample))))


def probe_denoiser() -> ProbeDenoiser:
    return _seeded(ProbeDenoiser)


class _NaNWhenBright(nn.Module):
    def forward(self, x):
        bright = x.float().mean(dim=(1, 2, 3)) > 0.5
        return torch.where(bright[:, None, None, None], torch.full_like(x, float("nan")), x)


class _Huge(nn.Module):
    def forward(self, x):
        return x * 0 + 1e6


class _OddLayers(nn.Module):
    """A plain denoiser with one well-behaved layer (`good`) and one odd one (`bad` or `huge`)."""

    in_channels, sample_size = 3, 8

    def __init__(self, odd: nn.Module, name: str) -> None:
        super().__init__()
        self.good = nn.Conv2d(3, 4, 3, padding=1)
        self.add_module(name, odd)
        self.odd_name = name
        self.out = nn.Conv2d(4, 3, 1)

    def forward(self, sample, timestep):
        h = self.good(sample)
        getattr(self, self.odd_name)(sample)
        return self.out(h)


def nan_denoiser() -> nn.Module:
    return _seeded(_OddLayers, odd=_NaNWhenBright(), name="bad")


def huge_denoiser() -> nn.Module:
    return _seeded(_OddLayers, odd=_Huge(), name="huge")


def not_a_model() -> str:
    return "a string, not a model"


# ---- images -------------------------------------------------------------------------------------------
def flat_colour(i: int) -> tuple[int, int, int]:
    """The colour of image i < 32 in `write_images`: distinct per image, far from white."""
    return (8 * i, 120 - 3 * i, (37 * i) % 120)


def write_images(
    folder: Path,
    n: int,
    *,
    size: int = 12,
    corrupt: tuple[int, ...] = (),
    bright: tuple[int, ...] = (),
    csv_name: str | None = "labels.csv",
) -> Path:
    """PNGs img_0000.png ... of flat colours (`flat_colour`), some corrupt (garbage bytes), some white;
    and a CSV (file, label, caption) naming every file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img_{i:04d}.png"
        if i in corrupt:
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png " + bytes(range(64)))
        else:
            colour = (255, 255, 255) if i in bright else flat_colour(i)
            Image.new("RGB", (size, size), colour).save(folder / name)
        rows.append({"file": name, "label": f"class{i % 3}", "caption": f"caption {i}"})
    if csv_name:
        write_labels_csv(folder / csv_name, rows)
    return folder


def write_labels_csv(path: Path, rows: list[dict]) -> None:
    """A labels CSV (file, label, caption) as FolderSource reads it."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "label", "caption"])
        writer.writeheader()
        writer.writerows(rows)


# ---- stores -------------------------------------------------------------------------------------------
def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes), except the writer's lock file (not data)."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def file_stats(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under `directory` (relative path -> (inode, mtime_ns, size)): shows whether it was rewritten."""
    directory = Path(directory)
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != LOCK_NAME:
            st = p.stat()
            out[p.relative_to(directory).as_posix()] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a `python -m diffdissect` subprocess: this folder importable, one thread, offline."""
    env = dict(os.environ)
    env.pop(SLEEP_ENV, None)
    env.pop(HANG_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1"
    )
    env.update(extra)
    return env


def one_thread():
    """Context for in-process captures: torch on one thread (fast on a loaded 2-core machine, and the same
    arithmetic as the OMP_NUM_THREADS=1 subprocesses), restored afterwards."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return ctx()


def tensors_of(directory: Path) -> dict[tuple[str, int], np.ndarray]:
    """Every (layer, t) slice of a store, loaded whole (small test stores only)."""
    from diffdissect.store import open_store

    reader = open_store(directory)
    return {
        (layer, t): reader.load(layer, t, format="torch").float().numpy()
        for layer in reader.layers
        for t in reader.timesteps
    }


def assert_same_store(got: Path, want: Path) -> None:
    """Same manifest (shard list, sha256s, everything), same tensors, same index.csv, same bytes everywhere."""
    import json

    from diffdissect.store import Manifest, verify_store

    m_got, m_want = Manifest.load(got), Manifest.load(want)
    assert m_got.complete and m_want.complete
    assert [(s.name, s.rows, s.sha256) for s in m_got.shards] == [(s.name, s.rows, s.sha256) for s in m_want.shards]
    assert json.loads((got / "manifest.json").read_text()) == json.loads((want / "manifest.json").read_text())
    t_got, t_want = tensors_of(got), tensors_of(want)
    assert t_got.keys() == t_want.keys()
    for key in t_want:
        np.testing.assert_array_equal(t_got[key], t_want[key], err_msg=str(key))
    assert (got / "index.csv").read_text() == (want / "index.csv").read_text()
    assert snapshot(got) == snapshot(want)  # and no leftover or extra file anywhere
    report = verify_store(got)
    assert report.ok and not report.warnings, report


# ---- the CLI --------------------------------------------------------------------------------------------
def capture_args(images: Path, out: Path, *extra: str, model: str = TINY_FACTORY) -> list[str]:
    """`diffdissect capture` arguments (without the program name) for a small capture of `images`
    (+ its labels.csv): 2 layers x 2 timesteps x 2 seeds, 2 images per shard. `extra` may override options."""
    return [
        "capture",
        "--model",
        model,
        "--images",
        str(images),
        "--labels-csv",
        str(Path(images) / "labels.csv"),
        "--layers",
        "blocks.0",
        "mid",
        "--timesteps",
        "10",
        "600",
        "--seeds",
        "0",
        "1",
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def run_cli(images: Path, out: Path, *extra: str, model: str = TINY_FACTORY) -> int:
    """`diffdissect capture` (capture_args) in this process, on one thread; returns the exit code."""
    from diffdissect.cli import main

    with one_thread():
        return main(capture_args(images, out, *extra, model=model))
