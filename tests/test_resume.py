"""Kill and resume: an interrupted capture, started again with the same command, ends with exactly the
bytes an uninterrupted run writes; a store made with another spec is refused and left untouched.

The centre piece is a real `python -m diffdissect capture` subprocess killed with SIGKILL mid-capture.
The other crash points are simulated in-process (a crash between a shard's rename and the manifest update,
Ctrl-C inside a shard write, leftovers of killed atomic writes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _store_helpers import (
    HANG_ENV,
    SLEEP_ENV,
    TINY_FACTORY,
    assert_same_store,
    capture_args,
    copy_store,
    file_stats,
    one_thread,
    run_cli,
    snapshot,
    subprocess_env,
    write_images,
)
from diffdissect.errors import StoreError
from diffdissect.store import Manifest, verify_store
from diffdissect.store.writer import StoreWriter

N_IMAGES = 10  # shard size 2: 5 shards of 4 rows (2 seeds)
N_SHARDS = 5


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def api_capture(images: Path, out: Path, target=None, **changes):
    """The same capture as `capture_args` through the Python API (a target and spec may be changed)."""
    from diffdissect import CaptureConfig, FolderSource, load_target
    from diffdissect.capture import capture

    spec = CaptureConfig(
        **{
            "layers": ["blocks.0", "mid"],
            "timesteps": [10, 600],
            "seeds": [0, 1],
            "shard_size": 2,
            "batch_size": 2,
            **changes,
        }
    )
    target = target or load_target(TINY_FACTORY)
    with one_thread():
        return capture(target, FolderSource(str(images), str(images / "labels.csv")), spec, out, progress=False)


class Crash(BaseException):
    """Stands in for the process dying: nothing in diffdissect catches it."""


def crash_at_manifest_write(mp: pytest.MonkeyPatch, n: int) -> None:
    """Die at the n-th manifest write (1: the new store, 2: after shard 0 was renamed into place, ...)."""
    real = StoreWriter._write_manifest
    calls = []

    def write_manifest(self):
        calls.append(1)
        if len(calls) == n:
            raise Crash(f"crash at manifest write {n}")
        real(self)

    mp.setattr(StoreWriter, "_write_manifest", write_manifest)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("resume-images"), N_IMAGES)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The uninterrupted run. Read-only."""
    out = tmp_path_factory.mktemp("reference") / "store"
    assert run_cli(images, out) == 0
    manifest = Manifest.load(out)
    assert manifest.complete and len(manifest.shards) == N_SHARDS and manifest.rows == 2 * N_IMAGES
    return out


@pytest.fixture
def interrupted(images, tmp_path) -> Path:
    """A store whose capture died after committing shards 0 and 1 (shard 2 renamed but not recorded)."""
    out = tmp_path / "interrupted"
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Crash):
        crash_at_manifest_write(mp, 4)
        run_cli(images, out)
    return out


# ---- simulated crashes, in-process ----------------------------------------------------------------------
def test_resume_after_a_crash_between_shard_rename_and_manifest_update(images, reference, interrupted):
    manifest = Manifest.load(interrupted)
    assert not manifest.complete and [s.name for s in manifest.shards] == [
        "shard-000000.safetensors",
        "shard-000001.safetensors",
    ]
    assert (interrupted / "shards" / "shard-000002.safetensors").is_file()  # on disk, not committed
    assert not (interrupted / "index.csv").exists()
    report = verify_store(interrupted)
    assert report.ok and any("shard-000002.safetensors" in w and "not listed" in w for w in report.warnings)
    committed = {
        k: v
        for k, v in file_stats(interrupted).items()
        if k in ("shards/shard-000000.safetensors", "shards/shard-000001.safetensors")
    }
    assert run_cli(images, interrupted) == 0
    assert_same_store(interrupted, reference)
    after = file_stats(interrupted)
    assert {k: after[k] for k in committed} == committed  # committed shards were kept, not rewritten


def test_resume_rewrites_an_uncommitted_shard_and_removes_leftover_temporaries(images, reference, interrupted):
    """A shard file the manifest does not list is never trusted, whatever it holds; temporaries of atomic
    writes killed mid-way (left behind by SIGKILL) are removed."""
    uncommitted = interrupted / "shards" / "shard-000002.safetensors"
    uncommitted.write_bytes(b"\0" * uncommitted.stat().st_size)
    (interrupted / "shards" / ".shard-000003.safetensors.99999.tmp").write_bytes(b"half a shard")
    (interrupted / ".manifest.json.99999.tmp").write_bytes(b'{"format": "diffdissect-st')
    (interrupted / ".index.csv.99999.tmp").write_bytes(b"row,input_id\n0,")
    assert run_cli(images, interrupted) == 0
    assert_same_store(interrupted, reference)


def test_ctrl_c_inside_a_shard_write_leaves_no_partial_shard_and_resumes(images, reference, tmp_path, capsys):
    import diffdissect.atomic as atomic

    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "shard-000003.safetensors":
            assert Path(src).stat().st_size > 0  # the temporary file was fully written
            raise KeyboardInterrupt
        real_replace(src, dst)

    out = tmp_path / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atomic.os, "replace", replace)
        assert run_cli(images, out) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"shard-{i:06d}.safetensors" for i in range(3)]
    assert [s.name for s in Manifest.load(out).shards] == [f"shard-{i:06d}.safetensors" for i in range(3)]
    assert verify_store(out).ok
    assert run_cli(images, out) == 0
    assert_same_store(out, reference)


def test_resuming_a_complete_store_is_a_no_op(images, reference, tmp_path):
    store = copy_store(reference, tmp_path / "store")
    before, stats = snapshot(store), file_stats(store)
    assert run_cli(images, store) == 0
    assert snapshot(store) == before
    after = file_stats(store)
    shards = [k for k in stats if k.startswith("shards/")]
    assert len(shards) == N_SHARDS and {k: after[k] for k in shards} == {k: stats[k] for k in shards}


def test_api_and_cli_write_the_same_store(images, reference, tmp_path):
    """The Python API with the CLI's settings makes the same store (so the refusals below are about the
    changed field only)."""
    api_capture(images, tmp_path / "store")
    assert_same_store(tmp_path / "store", reference)


# ---- a different spec is refused, and the store is left as it was ---------------------------------------
def _other_weights(mp, tmp_path):
    """The same source string ("package.module:factory") returning other weights."""
    import diffdissect.models.tiny as tiny
    from diffdissect import load_target

    real = tiny.tiny_denoiser
    mp.setattr(tiny, "tiny_denoiser", lambda seed=0: real(seed + 1))
    return {"target": load_target(TINY_FACTORY)}


def _random_init(mp, tmp_path):
    from diffdissect import load_target

    return {"target": load_target(TINY_FACTORY, random_init=True)}


def _other_images(mp, tmp_path):
    """The same file names and labels in another folder, one image different."""
    other = write_images(tmp_path / "other-images", N_IMAGES)
    (other / "img_0003.png").write_bytes((other / "img_0004.png").read_bytes())
    return {"images": other}


CHANGES = {
    "layers": ({"layers": ["blocks.0"]}, "capture.layers"),
    "layer-order": ({"layers": ["mid", "blocks.0"]}, "capture.layers"),
    "timesteps": ({"timesteps": [10, 601]}, "capture.timesteps"),
    "seeds": ({"seeds": [0, 2]}, "capture.seeds"),
    "dtype": ({"dtype": "float32"}, "capture.dtype"),
    "pooling": ({"pooling": "none"}, "capture.pooling"),
    "shard-size": ({"shard_size": 3}, "shard_size"),
    "limit": ({"limit": 6}, "capture.limit"),
    "random-init": (_random_init, "model.random_init_seed"),
    "other-weights": (_other_weights, "model.weights_fingerprint"),
    "other-images": (_other_images, "source.content"),  # what the images hold, not where
}


@pytest.mark.parametrize("state", ["interrupted", "complete"])
@pytest.mark.parametrize("change", CHANGES)
def test_resume_with_a_different_spec_is_refused(images, reference, tmp_path, request, change, state):
    if state == "interrupted":
        store = request.getfixturevalue("interrupted")
    else:
        store = copy_store(reference, tmp_path / "complete")
    before, stats = snapshot(store), file_stats(store)
    how, field = CHANGES[change]
    with pytest.MonkeyPatch.context() as mp:
        kwargs = how(mp, tmp_path) if callable(how) else dict(how)
        with pytest.raises(StoreError) as err:
            api_capture(kwargs.pop("images", images), store, **kwargs)
    message = str(err.value)
    assert "different spec" in message and field in message and "Refusing to mix" in message, message
    assert snapshot(store) == before and file_stats(store) == stats  # untouched, byte for byte
    # and the right command still resumes (or completes) it
    assert run_cli(images, store) == 0
    assert_same_store(store, reference)


# ---- the real thing: SIGKILL ----------------------------------------------------------------------------
KILL_IMAGES = 20  # 10 shards; 4 forwards per shard (2 timesteps x 2 seeds, batch 2)
HANG_AFTER = 1 + 4 * 6  # the shape probe + 6 shards: the victim can never get past shard 5
POLL_TIMEOUT_S = 120


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_capture_then_the_same_command_resumes_to_identical_bytes(tmp_path):
    """A real `python -m diffdissect capture` subprocess is killed with SIGKILL after it committed at least
    one shard and before it finished; the same command then completes the store, which must equal, byte for
    byte, the store of an uninterrupted run of the same command (run in this process meanwhile)."""
    images = write_images(tmp_path / "images", KILL_IMAGES)
    model = "_store_helpers:slow_denoiser"  # TinyDenoiser that sleeps in forward, and hangs at HANG_AFTER
    victim_out, reference_out = tmp_path / "resumed", tmp_path / "reference"
    log_path = tmp_path / "victim.log"
    command = [sys.executable, "-m", "diffdissect"]
    with open(log_path, "wb") as log:
        victim = subprocess.Popen(
            command + capture_args(images, victim_out, model=model),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=subprocess_env(**{SLEEP_ENV: "0.05", HANG_ENV: str(HANG_AFTER)}),
        )
    try:
        # the uninterrupted run, meanwhile, in this process (same command, one thread like the subprocesses)
        assert run_cli(images, reference_out, model=model) == 0
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while True:
            manifest = _read_manifest(victim_out)
            if manifest and manifest["shards"] and not manifest["complete"]:
                break
            assert victim.poll() is None, f"the capture exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no shard committed after {POLL_TIMEOUT_S}s:\n{log_path.read_text()}"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()

    killed = Manifest.load(victim_out)
    assert not killed.complete and 1 <= len(killed.shards) <= 6 and killed.rows < 2 * KILL_IMAGES
    assert verify_store(victim_out).ok  # what was committed is intact
    committed = {f"shards/{s.name}": file_stats(victim_out)[f"shards/{s.name}"] for s in killed.shards}

    # the same command again (in this process: the kill above was the real thing, a second interpreter
    # start-up would only cost time)
    assert run_cli(images, victim_out, model=model) == 0
    assert_same_store(victim_out, reference_out)
    after = file_stats(victim_out)
    assert {k: after[k] for k in committed} == committed  # resumed, not redone
    assert Manifest.load(victim_out).rows == 2 * KILL_IMAGES
