"""The fault suite (issue 21): nothing mixed, nothing lost, nothing outside the store.

Each test names the promise of docs/reliability.md it checks. Kills are real SIGKILLs of a child process at a
seeded random point among the job's file-system commits (every os.replace / os.fsync: between a temporary file's
write and its rename, between a shard and its manifest, mid-checkpoint); a full disk is an ENOSPC injected into
the n-th fsync (no tmpfs can be mounted here). After each fault the same call must finish with exactly the bytes
(or tensors) of an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from _store_helpers import file_stats, snapshot
from diffdissect.capture import CaptureConfig, capture
from diffdissect.cli import main
from diffdissect.data import FolderSource
from diffdissect.errors import DataError, SpecError, StoreError
from diffdissect.lock import LOCK_NAME, DirectoryLock, LockedError
from diffdissect.models import load_target
from diffdissect.sae import TrainConfig, train_sae, train_saes
from diffdissect.store import open_store, verify_store, write_array_store
from diffdissect.store.manifest import Manifest

TESTS = Path(__file__).parent
SPEC = dict(layers=["mid_block"], timesteps=[10, 500], seeds=[0, 1], shard_size=2, batch_size=2)


# ---- helpers ------------------------------------------------------------------------------------------------------
def cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def cli_error(capsys, argv: list[str]) -> str:
    code, err = cli(capsys, argv)
    assert code == 2 and err.startswith("diffdissect: error: "), (code, err)
    return err


def job_capture(model: str, images: str, out: str) -> None:
    capture(
        load_target(model),
        FolderSource(images, Path(images) / "labels.csv"),
        CaptureConfig(**SPEC),
        out,
        progress=False,
    )


SAE = dict(layer="x", t=10, k=4, n_latents=32, steps=24, checkpoint_every=3, batch_size=64)


def job_sae(store: str, out: str) -> None:
    train_sae(store, TrainConfig(**SAE), out, progress=False)


def _directions_config():
    from diffdissect.directions import DirectionsConfig
    from diffdissect.directions.prompts import build_prompt_set

    prompts = build_prompt_set(["a red square", "a blue circle"])
    return DirectionsConfig(
        prompts=prompts,
        seeds=[0, 1, 2],
        layers=["mid_block"],
        steps=2,
        guidance_scale=1.0,
        batch_size=2,
        text_source="prompts",
        resamples=50,
        permutations=50,
    )


def job_directions(model: str, out: str) -> None:
    from diffdissect.directions import run_directions

    run_directions(load_target(model), _directions_config(), out, None, progress=False)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4))

    def forward(self, x):
        return self.body(x)


def job_invert(model: str, out: str, steps: int = 6) -> None:
    from diffdissect.invert import FeatureExtractor, InvertTrainConfig
    from diffdissect.invert.run import train_from_images

    images = np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    train_from_images(
        load_target(model),
        FeatureExtractor(TinyCNN(), "body"),
        "tiny",
        images,
        out,
        InvertTrainConfig(steps=steps, batch_size=4, checkpoint_every=2, warmup=1),
        progress=False,
    )


JOBS = {"capture": job_capture, "sae": job_sae, "directions": job_directions, "invert": job_invert}


def child(job: str, kill_at: int, *args: str) -> None:
    """Run `job` in this (child) process and SIGKILL it just before its `kill_at`-th commit (os.replace/fsync)."""
    calls = [0]

    def hooked(real):
        def call(*a, **kw):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)

        return call

    os.replace, os.fsync = hooked(os.replace), hooked(os.fsync)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    JOBS[job](*args)


class Commits:
    """Count a job's commits in this process (the range the kill point is drawn from)."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("replace", "fsync"):
            real = getattr(os, name)

            def call(*a, _real=real, **kw):
                self.n += 1
                return _real(*a, **kw)

            monkeypatch.setattr(os, name, call)


def run_killed(job: str, kill_at: int, *args) -> int:
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_faults; "
        f"test_faults.child({job!r}, {kill_at}, *{[str(a) for a in args]!r})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return proc.returncode


def kill_points(total: int, seeds: list[int]) -> list[int]:
    return [int(np.random.default_rng(seed).integers(1, total)) for seed in seeds]


def enospc_on(monkeypatch, n: int) -> None:
    """The disk fills at the n-th fsync: it raises ENOSPC (as a full disk does when the data is flushed)."""
    real, count = os.fsync, [0]

    def fsync(fd):
        count[0] += 1
        if count[0] == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _hold_lock(directory: str, ready, release) -> None:
    with DirectoryLock(directory, "test holder"):
        ready.set()
        release.wait(60)


@pytest.fixture
def held_lock():
    """A real second process holding a directory's lock: yields (start(directory) -> pid, stop())."""
    ctx = multiprocessing.get_context("fork")
    procs = []

    def start(directory: Path) -> int:
        ready, release = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_hold_lock, args=(str(directory), ready, release))
        proc.start()
        assert ready.wait(30)
        procs.append((proc, release))
        return proc.pid

    yield start
    for proc, release in procs:
        release.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


@pytest.fixture(scope="module")
def images(tmp_path_factory, image_folder) -> Path:
    return Path(shutil.copytree(image_folder, tmp_path_factory.mktemp("faults") / "images"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, unet2d_dir, images) -> Path:
    out = tmp_path_factory.mktemp("faults") / "reference"
    job_capture(str(unet2d_dir), str(images), str(out))
    return out


def array_store(path: Path, n: int = 240, d: int = 8, dtype: str = "float32", seed: int = 0) -> Path:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    write_array_store(
        path,
        {("x", 10): x},
        [{"input_id": f"im{i}", "label": str(i % 3)} for i in range(n)],
        shard_rows=60,
        dtype=dtype,
    )
    return path


def rewrite_shard(store: Path, name: str, edit, fix_checksum: bool = True) -> None:
    """Change a shard's tensors with `edit(tensors)`; with fix_checksum the manifest is updated to match (a store
    whose checksum passes but whose numbers are bad: only the finiteness check can catch it)."""
    from safetensors import safe_open
    from safetensors.torch import save

    from diffdissect.atomic import sha256_file
    from diffdissect.store.writer import canonical_safetensors

    path = store / "shards" / name
    with safe_open(str(path), "pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    edit(tensors)
    path.write_bytes(canonical_safetensors(save(tensors, metadata=meta)))
    st = path.stat()  # as a later change would: this process's checksum cache is keyed by (path, size, mtime)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    if fix_checksum:
        manifest = json.loads((store / "manifest.json").read_text())
        for s in manifest["shards"]:
            if s["name"] == name:
                s["sha256"], s["bytes"] = sha256_file(path), path.stat().st_size
        (store / "manifest.json").write_text(json.dumps(manifest))


# ==== 1. one writer per directory =====================================================================================
def test_a_second_writer_is_refused_naming_the_holders_pid(tmp_path, held_lock, unet2d_dir, images, capsys):
    out = tmp_path / "store"
    pid = held_lock(out)
    err = cli_error(
        capsys, ["capture", "--model", unet2d_dir, "--images", images, "--layers", "mid_block", "--out", out, "--quiet"]
    )
    assert f"PID {pid}" in err and "another process" in err
    assert not (out / "manifest.json").exists()
    store = array_store(tmp_path / "arrays")
    pid = held_lock(tmp_path / "sae")
    with pytest.raises(LockedError, match=f"PID {pid}"):
        job_sae(str(store), str(tmp_path / "sae"))
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [LOCK_NAME]


def test_inverter_and_directions_runs_take_the_lock(tmp_path, held_lock, sd_dir):
    for job in ("invert", "directions"):
        pid = held_lock(tmp_path / job)
        with pytest.raises(LockedError, match=f"PID {pid}"):
            JOBS[job](str(sd_dir), str(tmp_path / job))


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    proc.start()
    assert ready.wait(30)
    with pytest.raises(LockedError):
        DirectoryLock(tmp_path).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with DirectoryLock(tmp_path):  # the kernel dropped the dead holder's lock
        pass


# ==== 2. full identities ==============================================================================================
def _interrupted_capture(model, images, out, monkeypatch) -> None:
    """A capture stopped after its first shard (as a kill would leave it)."""
    from diffdissect.store import writer as store_writer

    original, done = store_writer.StoreWriter.write_shard, []

    def once(self, *args, **kwargs):
        if done:
            raise KeyboardInterrupt
        done.append(1)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(store_writer.StoreWriter, "write_shard", once)
        with pytest.raises(KeyboardInterrupt):
            job_capture(str(model), str(images), str(out))


def _model_copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _edit_weights(path: Path, edit) -> None:
    from safetensors.torch import save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _negate_most(tensors):  # 98.5%-style: every value after the first 64 of each tensor flips sign
    for k, v in tensors.items():
        flat = v.flatten().clone()
        flat[64:] = -flat[64:]
        tensors[k] = flat.reshape(v.shape)


def _beta_schedule(model: Path) -> None:
    path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["beta_schedule"] = "scaled_linear" if config.get("beta_schedule") != "scaled_linear" else "linear"
    path.write_text(json.dumps(config))


MODEL_CHANGES = {
    "vae": (
        lambda m: _edit_weights(
            m / "vae" / "diffusion_pytorch_model.safetensors", lambda t: t.update({k: v * 1.01 for k, v in t.items()})
        )
    ),
    "scheduler-beta-schedule": _beta_schedule,
    "unet-98pct-negated": (lambda m: _edit_weights(m / "unet" / "diffusion_pytorch_model.safetensors", _negate_most)),
}


@pytest.mark.parametrize("change", MODEL_CHANGES)
def test_resume_after_a_model_change_is_refused(tmp_path, sd_dir, images, monkeypatch, change):
    model = _model_copy(sd_dir, tmp_path / "model")
    out = tmp_path / "store"
    _interrupted_capture(model, images, out, monkeypatch)
    MODEL_CHANGES[change](model)
    with pytest.raises(StoreError, match=r"different spec \(differs in: .*model\.content_sha256"):
        job_capture(str(model), str(images), str(out))


def test_resume_after_the_images_changed_under_the_same_names_is_refused(tmp_path, unet2d_dir, images, monkeypatch):
    folder = Path(shutil.copytree(images, tmp_path / "images"))
    out = tmp_path / "store"
    _interrupted_capture(unet2d_dir, folder, out, monkeypatch)
    Image.new("RGB", (30, 30), (9, 9, 9)).save(folder / "img005.png")
    with pytest.raises(StoreError, match=r"differs in: source\.content"):
        job_capture(str(unet2d_dir), str(folder), str(out))


def test_identity_does_not_depend_on_how_a_path_is_spelled(tmp_path, unet2d_dir, images, reference, monkeypatch):
    """Interrupted with absolute paths; resumed from a moved model and image folder, spelled relatively."""
    model = _model_copy(unet2d_dir, tmp_path / "a" / "model")
    folder = Path(shutil.copytree(images, tmp_path / "a" / "images"))
    out = tmp_path / "store"
    _interrupted_capture(model, folder, out, monkeypatch)
    moved = tmp_path / "b"
    shutil.move(tmp_path / "a", moved)
    monkeypatch.chdir(moved)
    job_capture("./model", "images", str(out))
    data = {k: v for k, v in snapshot(out).items() if k != "manifest.json"}
    assert data == {k: v for k, v in snapshot(reference).items() if k != "manifest.json"}
    ours, theirs = Manifest.load(out), Manifest.load(reference)
    assert ours.spec_hash == theirs.spec_hash and ours.model["content_sha256"] == theirs.model["content_sha256"]


def test_a_resume_reuses_the_model_digest_while_the_files_are_unchanged(tmp_path, unet2d_dir, images, monkeypatch):
    from diffdissect.models import target as target_module

    model = _model_copy(unet2d_dir, tmp_path / "model")
    out = tmp_path / "store"
    _interrupted_capture(model, images, out, monkeypatch)
    calls = []
    real = target_module.content_digest
    monkeypatch.setattr(target_module, "content_digest", lambda *a: calls.append(1) or real(*a))
    job_capture(str(model), str(images), str(out))
    assert calls == []  # sizes and mtimes as recorded: no rehash
    weights = model / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    job_capture(str(model), str(images), str(out))
    assert calls == [1]  # touched: hashed again (same content, so accepted)


def test_an_old_format_store_is_read_but_not_resumed(tmp_path, reference, unet2d_dir, images):
    old = Path(shutil.copytree(reference, tmp_path / "old"))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest.pop("locations")
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="store of format 1.*cannot be resumed"):
        assert open_store(old).load("mid_block", 10).shape[0] == 12
    with pytest.raises(StoreError, match="older diffdissect .*store format 1.*capture into a new --out"):
        job_capture(str(unet2d_dir), str(images), str(old))


# ==== 3. checkpoints are atomic units =================================================================================
@pytest.fixture(scope="module")
def sae_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae")
    store = array_store(root / "store")
    job_sae(str(store), str(root / "straight"))
    return store, load_file(root / "straight" / "checkpoint.safetensors")


def assert_same_checkpoint(directory: Path, reference: dict) -> None:
    got = load_file(directory / "checkpoint.safetensors")
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got)


def test_sae_sigkill_at_random_points_resumes_to_the_same_model(tmp_path, sae_reference, monkeypatch):
    store, reference = sae_reference
    with monkeypatch.context() as mp:
        commits = Commits(mp)
        job_sae(str(store), str(tmp_path / "count"))
    for seed in (0, 1):
        out = tmp_path / f"killed-{seed}"
        kill_at = kill_points(commits.n, [seed])[0]
        assert run_killed("sae", kill_at, store, out) == -signal.SIGKILL
        job_sae(str(store), str(out))
        assert_same_checkpoint(out, reference)


def test_sae_disk_full_mid_checkpoint_keeps_the_previous_one(tmp_path, sae_reference, monkeypatch, capsys):
    store, reference = sae_reference
    out = tmp_path / "run"
    config = tmp_path / "sae.json"
    config.write_text(json.dumps({k: v for k, v in SAE.items() if k not in ("layer", "t")}))
    with monkeypatch.context() as mp:
        enospc_on(mp, 5)  # the 2nd checkpoint's file (each checkpoint: 2 files x (file, dir) fsyncs)
        err = cli_error(
            capsys,
            ["sae", "train", store, "--layers", "x", "--timesteps", "10", "--config", config, "--out", out, "--quiet"],
        )
    assert "disk is full" in err and "previous checkpoint (step 3) is intact" in err
    run = next(p for p in out.iterdir() if p.is_dir())
    info = json.loads((run / "config.json").read_text())
    meta_step = __import__("safetensors").safe_open(str(run / "checkpoint.safetensors"), "pt").metadata()["step"]
    assert info["step"] == 3 and meta_step == "3"  # the previous checkpoint, whole
    job_sae(str(store), str(run))
    assert_same_checkpoint(run, reference)


def test_an_sae_out_reused_with_another_store_is_refused(tmp_path, sae_reference, monkeypatch):
    store, _ = sae_reference
    other = array_store(tmp_path / "other", seed=1)
    finished = tmp_path / "finished"
    job_sae(str(store), str(finished))
    with pytest.raises(SpecError, match=r"another store .*slice\.store_identity"):
        job_sae(str(other), str(finished))
    interrupted = tmp_path / "interrupted"
    from diffdissect.sae import train as sae_train

    real = sae_train.save_checkpoint
    with monkeypatch.context() as mp:

        def save_then_stop(*a, **k):
            real(*a, **k)
            raise KeyboardInterrupt

        mp.setattr(sae_train, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            job_sae(str(store), str(interrupted))
    with pytest.raises(SpecError, match="another store"):
        job_sae(str(other), str(interrupted))


def test_inverter_kill_mid_checkpoint_resumes_from_previous(tmp_path, sd_dir, monkeypatch):
    straight = tmp_path / "straight"
    job_invert(str(sd_dir), str(straight))
    from diffdissect import atomic
    from diffdissect.invert import model as invert_model

    out = tmp_path / "killed"
    real, writes = atomic.atomic_write_bytes, []

    def die_after_the_first_file_of_the_second_checkpoint(path, data):
        writes.append(Path(path).name)
        if writes.count("inverter.safetensors") == 2 and Path(path).name == "optimizer.safetensors":
            raise KeyboardInterrupt  # as a SIGKILL here: new weights, old optimiser state and config
        return real(path, data)

    with monkeypatch.context() as mp:
        mp.setattr(invert_model, "atomic_write_bytes", die_after_the_first_file_of_the_second_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            job_invert(str(sd_dir), str(out))
    assert (out / "previous" / "config.json").is_file()
    with pytest.warns(UserWarning, match="resuming from the previous one"):
        job_invert(str(sd_dir), str(out))
    a, b = load_file(straight / "inverter.safetensors"), load_file(out / "inverter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "training.json").read_bytes() == (out / "training.json").read_bytes()


# ==== SIGKILL at random points: capture, directions, inverter =====================================================
def test_capture_sigkill_at_random_points_resumes_byte_identical(tmp_path, unet2d_dir, images, reference, monkeypatch):
    with monkeypatch.context() as mp:
        commits = Commits(mp)
        job_capture(str(unet2d_dir), str(images), str(tmp_path / "count"))
    for seed in (0, 1):
        out = tmp_path / f"killed-{seed}"
        assert run_killed("capture", kill_points(commits.n, [seed])[0], unet2d_dir, images, out) == -signal.SIGKILL
        job_capture(str(unet2d_dir), str(images), str(out))
        assert snapshot(out) == snapshot(reference), seed


def _files(directory: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(directory).items() if "previous/" not in k}


def test_directions_and_inverter_sigkill_resume_byte_identical(tmp_path, sd_dir, monkeypatch):
    for job in ("directions", "invert"):
        reference = tmp_path / f"{job}-reference"
        with monkeypatch.context() as mp:
            commits = Commits(mp)
            JOBS[job](str(sd_dir), str(reference))
        again = tmp_path / f"{job}-again"
        JOBS[job](str(sd_dir), str(again))
        assert _files(again) == _files(reference), f"{job}: a rerun writes other bytes"
        out = tmp_path / f"{job}-killed"
        kill_at = kill_points(commits.n, [7])[0]
        assert run_killed(job, kill_at, sd_dir, out) == -signal.SIGKILL
        JOBS[job](str(sd_dir), str(out))
        assert _files(out) == _files(reference), job


def test_directions_commits_progress_every_batch(tmp_path, sd_dir, monkeypatch):
    from diffdissect.store import writer as store_writer

    real, shards = store_writer.StoreWriter.write_shard, []
    monkeypatch.setattr(
        store_writer.StoreWriter,
        "write_shard",
        lambda self, chunk, *a, **k: shards.append(len(a[1])) or real(self, chunk, *a, **k),
    )
    job_directions(str(sd_dir), str(tmp_path / "run"))
    assert shards == [2, 2, 2]  # 6 trajectories, batch 2: committed batch by batch


# ==== 4. thumbnails ===================================================================================================
def test_thumbnails_follow_the_recorded_file_and_content(tmp_path, unet2d_dir, images):
    from diffdissect.sae.browser import resolve_image

    folder = Path(shutil.copytree(images, tmp_path / "images"))
    out = tmp_path / "store"
    job_capture(str(unet2d_dir), str(folder), str(out))
    rows = open_store(out).rows()
    for name in ("a0.png", "a1.png", "a2.png"):  # sort first: every position shifts by 3
        Image.new("RGB", (20, 20), (200, 0, 0)).save(folder / name)
    source = FolderSource(folder)
    for row in rows:
        record = resolve_image(source, row)
        assert record is not None and record.input_id == row["input_id"]
        assert record.content_sha256 == row["image_sha256"]
    Image.new("RGB", (20, 20), (0, 0, 200)).save(folder / rows[0]["input_id"])  # changed since the capture
    assert resolve_image(FolderSource(folder), rows[0]) is None
    from diffdissect.sae.report import image_source_for

    assert Path(image_source_for(out).root) == folder.resolve()  # found where the manifest says


# ==== 5. readers check checksums and finiteness =======================================================================
@pytest.mark.parametrize("plant", ["inf", "float16-max"])
def test_readers_refuse_bad_values_and_name_the_shard(tmp_path, plant, capsys):
    store = array_store(tmp_path / "store", dtype="float16")
    value = float("inf") if plant == "inf" else 65504.0
    rewrite_shard(store, "shard-000002.safetensors", lambda t: t["x@t=10"].__setitem__((slice(0, 5), 0), value))
    err = cli_error(capsys, ["probe", store, "--labels", "label", "--out", tmp_path / "probe", "--bootstrap", "10"])
    assert "shard-000002.safetensors" in err and "NaN, inf or saturated" in err
    with pytest.raises(StoreError, match="shard-000002.safetensors"):
        job_sae(str(store), str(tmp_path / "sae"))


def test_readers_check_each_shards_checksum(tmp_path):
    store = array_store(tmp_path / "store")
    rewrite_shard(store, "shard-000001.safetensors", lambda t: t["x@t=10"].mul_(2), fix_checksum=False)
    with pytest.raises(StoreError, match="shard-000001.safetensors fails its checksum"):
        open_store(store).load("x", 10)


# ==== 7. truncation, 8. PIL modes =====================================================================================
def test_truncated_prompts_are_warned_and_recorded(tmp_path, sd_dir, images):
    target = load_target(sd_dir)
    limit = target.tokenizer.model_max_length
    words = " ".join(["red"] * (limit + 4))
    with pytest.warns(UserWarning, match="the text encoder saw only the first"):
        capture(
            target,
            FolderSource(images),
            CaptureConfig(layers=["mid_block"], timesteps=[10], prompt=words + " cat"),
            tmp_path / "store",
            progress=False,
        )
    notes = Manifest.load(tmp_path / "store").notes["truncated_prompts"]
    assert notes[words + " cat"]["kept"] == limit and "cat" in notes[words + " cat"]["dropped_text"]


def test_trajectory_prompts_are_checked_for_truncation(tmp_path, sd_dir):
    from diffdissect.capture import TrajectoryConfig, capture_trajectories

    target = load_target(sd_dir)
    long = " ".join(["blue"] * (target.tokenizer.model_max_length + 2))
    with pytest.warns(UserWarning, match="the text encoder saw only the first"):
        capture_trajectories(
            target,
            TrajectoryConfig(prompts=[long, "a cat"], steps=1, guidance_scale=1.0, save_images=False),
            tmp_path / "t",
            progress=False,
        )
    assert list(Manifest.load(tmp_path / "t").notes["truncated_prompts"]) == [long]


def _mode_image(mode: str) -> tuple[Image.Image, float]:
    """An image in `mode` whose true brightness (0..1) is known."""
    gray = np.linspace(0.1, 0.7, 64).reshape(8, 8)
    if mode == "I;16":
        return Image.fromarray((gray * 65535).astype(np.uint16)), float(gray.mean())
    if mode == "I":
        return Image.fromarray((gray * 65535).astype(np.int32), mode="I"), float(gray.mean())
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32), mode="F"), float(gray.mean())
    base = Image.fromarray((gray * 255).astype(np.uint8), mode="L")
    return base.convert(mode), float(gray.mean())


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "P", "LA", "CMYK", "RGBA", "L", "1"])
def test_every_pil_mode_keeps_its_brightness(tmp_path, mode):
    from diffdissect.data.transforms import to_rgb

    image, brightness = _mode_image(mode)
    if mode == "1":
        image, brightness = Image.fromarray(np.eye(8, dtype=bool)), 1 / 8
    rgb = np.asarray(to_rgb(image), np.float64) / 255
    assert rgb.shape == (8, 8, 3)
    assert abs(rgb.mean() - brightness) < 0.02, (mode, rgb.mean(), brightness)
    if mode in ("I;16", "P", "F"):  # through a file too, as a capture reads it
        path = tmp_path / ("x.tiff" if mode == "F" else "x.png")
        image.save(path)
        (tmp_path / "folder").mkdir()
        shutil.move(path, tmp_path / "folder" / path.name)
        loaded = np.asarray(FolderSource(tmp_path / "folder").load(0).image, np.float64) / 255
        assert abs(loaded.mean() - brightness) < 0.02, (mode, loaded.mean())


# ==== a hostile store must not reach outside itself ===============================================================
@pytest.mark.parametrize("name", ["../../outside/x.safetensors", "/etc/passwd", "shards/../x", ".."])
def test_hostile_shard_names_are_refused(tmp_path, name, capsys):
    store = array_store(tmp_path / "store")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="not a plain file name"):
        open_store(store)
    assert "not a plain file name" in cli_error(capsys, ["store", "verify", store])


def test_a_symlink_leaving_the_store_is_refused(tmp_path, capsys):
    store = array_store(tmp_path / "store")
    outside = tmp_path / "outside.safetensors"
    shutil.move(store / "shards" / "shard-000000.safetensors", outside)
    (store / "shards" / "shard-000000.safetensors").symlink_to(outside)
    with pytest.raises(StoreError, match="outside the store"):
        open_store(store).load("x", 10)
    assert any("outside the store" in p for p in verify_store(store).problems)


def test_names_that_become_paths_stay_inside_out(tmp_path):
    store = tmp_path / "store"
    x = np.random.default_rng(0).normal(size=(120, 4)).astype(np.float32)
    write_array_store(store, {("../../../escaped", 10): x}, [{"input_id": f"i{i}"} for i in range(120)])
    out = tmp_path / "deep" / "er" / "runs"
    train_saes(
        store,
        [TrainConfig(layer="../../../escaped", t=10, k=2, n_latents=8, steps=2, batch_size=32)],
        out,
        progress=False,
    )
    outside = [p for p in tmp_path.rglob("*") if "escaped" in p.name and out not in p.parents]
    assert outside == [] and any("escaped" in p.name for p in out.iterdir())


def test_browser_escapes_every_context(tmp_path):
    import html as html_module
    import re

    from diffdissect.sae.browser import write_browser

    payload = "</title><script>alert(1)</script>__DATA__"
    data = {
        "title": payload,
        "labels": ["<!--<script>"],
        "latents": [{"latent": 0, "note": "a\u2028b</script>&"}],
        "summary": {},
    }
    page = write_browser(tmp_path / "b.html", data).read_text()
    assert f"<title>{html_module.escape(payload)}</title>" in page and f"<h1>{html_module.escape(payload)}</h1>" in page
    script = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert not set("<>&\u2028\u2029") & set(script)
    assert json.loads(script) == data


def test_a_row_count_that_disagrees_with_the_shards_is_refused(tmp_path):
    store = array_store(tmp_path / "store")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"][1]["rows"] += 40
    manifest["rows"] += 40
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="lists 60 rows, the manifest says 100"):
        job_sae(str(store), str(tmp_path / "sae"))
    manifest["rows"] += 1
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="states 281 rows"):
        open_store(store)


# ==== clear errors ====================================================================================================
@pytest.mark.parametrize("damage", ["truncated", "header", "deleted"])
def test_a_damaged_shard_is_a_clear_error_and_a_rerun_repairs_exactly_it(
    tmp_path, reference, unet2d_dir, images, damage, capsys
):
    store = Path(shutil.copytree(reference, tmp_path / "store"))
    bad = store / "shards" / "shard-000001.safetensors"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-100])
    elif damage == "header":
        bad.write_bytes(b"\xff" * 16 + bad.read_bytes()[16:])
    else:
        bad.unlink()
    err = cli_error(capsys, ["probe", store, "--labels", "label", "--out", tmp_path / "probe", "--bootstrap", "10"])
    assert "shard-000001.safetensors" in err and "run the same capture again" in err.lower()
    before = {k: v for k, v in file_stats(store).items() if k.startswith("shards/") and "000001" not in k}
    with pytest.warns(UserWarning, match="captured again"):
        job_capture(str(unet2d_dir), str(images), str(store))
    after = {k: v for k, v in file_stats(store).items() if k.startswith("shards/") and "000001" not in k}
    assert after == before  # only the bad shard was written again
    data = {k: v for k, v in snapshot(store).items() if k != "manifest.json"}
    assert data == {k: v for k, v in snapshot(reference).items() if k != "manifest.json"}
    repaired = json.loads((store / "manifest.json").read_text())
    assert repaired["notes"].pop("repaired_shards") == ["shard-000001.safetensors"]  # recorded, else the same
    assert repaired == json.loads((reference / "manifest.json").read_text())


def test_disk_full_while_writing_the_manifest(tmp_path, reference, unet2d_dir, images, monkeypatch, capsys):
    out = tmp_path / "store"
    with monkeypatch.context() as mp:
        enospc_on(mp, 5)  # new manifest (file, dir), shard 0 (file, dir), then the manifest
        err = cli_error(
            capsys,
            [
                "capture",
                "--model",
                unet2d_dir,
                "--images",
                images,
                "--labels-csv",
                images / "labels.csv",
                "--layers",
                "mid_block",
                "--timesteps",
                "10",
                "500",
                "--seeds",
                "0",
                "1",
                "--shard-size",
                "2",
                "--batch-size",
                "2",
                "--out",
                out,
                "--quiet",
            ],
        )
    assert "disk space" in err and "manifest.json" in err
    job_capture(str(unet2d_dir), str(images), str(out))
    assert snapshot(out) == snapshot(reference)


def test_model_directory_errors_are_clear(tmp_path, unet2d_dir, sd_dir, images, capsys, monkeypatch):
    broken = _model_copy(unet2d_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    assert "is not valid JSON" in cli_error(capsys, ["layers", "--model", broken])
    unknown = _model_copy(unet2d_dir, tmp_path / "unknown")
    (unknown / "scheduler_config.json").write_text(json.dumps({"_class_name": "NoSuchScheduler"}))
    assert "not a diffusers scheduler class" in cli_error(capsys, ["layers", "--model", unknown])
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert "no such directory" in cli_error(capsys, ["layers", "--model", "models/sd"])


def test_dit_class_id_out_of_range(tmp_path, dit_dir, images, capsys):
    err = cli_error(
        capsys,
        [
            "capture",
            "--model",
            dit_dir,
            "--images",
            images,
            "--layers",
            "transformer_blocks.0",
            "--class-label",
            "5000",
            "--out",
            tmp_path / "s",
            "--quiet",
        ],
    )
    assert "out of range" in err and "0..9" in err


def test_a_label_that_is_no_file_name_is_probed(tmp_path):
    store = tmp_path / "store"
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 4)).astype(np.float32) + y[:, None]
    write_array_store(store, {("x", 10): x}, [{"input_id": f"i{i}", "size/cm": str(v)} for i, v in enumerate(y)])
    assert main(["probe", str(store), "--labels", "size/cm", "--out", str(tmp_path / "p"), "--bootstrap", "10"]) == 0
    assert all(tmp_path / "p" in p.parents for p in tmp_path.rglob("*.png"))


# ==== also ============================================================================================================
def test_verify_checks_dtype_index_and_symlinks(tmp_path, reference, capsys):
    store = Path(shutil.copytree(reference, tmp_path / "store"))
    rewrite_shard(store, "shard-000000.safetensors", lambda t: t.update({k: v.float() for k, v in t.items()}))
    report = verify_store(store)
    assert any("stored as float32, the manifest says float16" in p for p in report.problems)
    store = Path(shutil.copytree(reference, tmp_path / "store2"))
    lines = (store / "index.csv").read_text().splitlines()
    lines[1], lines[3] = lines[3], lines[1]
    (store / "index.csv").write_text("\n".join(lines) + "\n")
    assert any(p.startswith("index.csv: row 0") for p in verify_store(store).problems)


def test_csv_bom_reserved_duplicates_and_outside_rows(tmp_path, images):
    folder = Path(shutil.copytree(images, tmp_path / "images"))
    text = "file,label,seed\nimg000.png,cat,3\nimg001.png,dog,4\n"
    (folder / "bom.csv").write_bytes("\ufeff".encode() + text.encode())
    with pytest.warns(UserWarning, match=r"\['seed'\] are reserved"):
        source = FolderSource(folder, folder / "bom.csv")
    assert source.load(1).label == "dog" and "seed" not in source.load(1).attributes
    (folder / "dup.csv").write_text("file,label\nimg000.png,a\nimg000.png,b\n")
    with pytest.raises(DataError, match="twice"):
        FolderSource(folder, folder / "dup.csv")
    outside = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(outside)
    (folder / "out.csv").write_text("file,label\n../x.png,a\n")
    with pytest.raises(DataError, match="not a file inside"):
        FolderSource(folder, folder / "out.csv")


def test_negative_shard_mb_and_empty_prompts_are_refused(tmp_path, unet2d_dir, sd_dir, images, capsys):
    err = cli_error(
        capsys,
        [
            "capture",
            "--model",
            unet2d_dir,
            "--images",
            images,
            "--layers",
            "mid_block",
            "--shard-mb",
            "-5",
            "--out",
            tmp_path / "a",
            "--quiet",
        ],
    )
    assert "shard_mb must be a positive" in err
    err = cli_error(
        capsys,
        [
            "capture",
            "--model",
            sd_dir,
            "--prompts",
            "a cat",
            " ",
            "--layers",
            "mid_block",
            "--out",
            tmp_path / "b",
            "--quiet",
        ],
    )
    assert "are empty" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "manifest.json").exists()
