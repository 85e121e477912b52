"""Bad input gets a clear error (the CLI prints `diffdissect: error: ...`, exits 2, no traceback), and
nothing already written is lost.

Unknown model path or format; unknown layer; t out of range; empty image folder; corrupt images (the
documented decision: skipped with a warning and counted; only corrupt images is an error); resuming with a
different spec; NaN/inf in activations; float16 overflow; running out of disk; --out in the way.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from _store_helpers import (
    TINY_FACTORY,
    assert_same_store,
    capture_args,
    copy_store,
    file_stats,
    one_thread,
    run_cli,
    snapshot,
    write_images,
)
from diffdissect.cli import main
from diffdissect.errors import DataError, LayerNotFoundError, ModelLoadError, SpecError
from diffdissect.store import Manifest, open_store, verify_store

N_IMAGES = 8


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("bad-input-images"), N_IMAGES)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """An uninterrupted `capture_args` run. Read-only."""
    out = tmp_path_factory.mktemp("bad-input-reference") / "store"
    assert run_cli(images, out) == 0
    return out


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect the error exit (2) with a one-line-per-problem message and no traceback."""
    with one_thread():
        code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.out, captured.err)
    assert captured.err.startswith("diffdissect: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return captured.err


# ---- models -----------------------------------------------------------------------------------------------
def _no_such_dir(tmp: Path) -> str:
    return str(tmp / "no-such-model")


def _a_file(tmp: Path) -> str:
    (tmp / "model.safetensors").write_bytes(b"weights")
    return str(tmp / "model.safetensors")


def _empty_dir(tmp: Path) -> str:
    (tmp / "empty-model").mkdir()
    return str(tmp / "empty-model")


def _config_without_class(tmp: Path) -> str:
    (tmp / "m").mkdir()
    (tmp / "m" / "config.json").write_text(json.dumps({"architectures": ["ResNetForImageClassification"]}))
    return str(tmp / "m")


def _config_with_unknown_class(tmp: Path) -> str:
    (tmp / "m").mkdir()
    (tmp / "m" / "config.json").write_text(json.dumps({"_class_name": "NoSuchUNet", "in_channels": 4}))
    return str(tmp / "m")


def _broken_pipeline(tmp: Path) -> str:
    (tmp / "p").mkdir()
    (tmp / "p" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    return str(tmp / "p")


BAD_MODELS = {
    "no-such-directory": (_no_such_dir, "unknown model"),
    "a-file": (_a_file, "is a file"),
    "empty-directory": (_empty_dir, "holds neither model_index.json"),
    "config-without-class": (_config_without_class, "has no '_class_name'"),
    "unknown-model-class": (_config_with_unknown_class, "'NoSuchUNet' is not a diffusers model class"),
    "broken-pipeline": (_broken_pipeline, "lists unet, but the folder is missing"),
    "unimportable-factory": (lambda tmp: "no_such_package_xyz.models:build", "cannot import 'no_such_package_xyz"),
    "uncached-hub-id": (lambda tmp: "no-such-org/no-such-model", "could not load 'no-such-org/no-such-model'"),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_is_a_clear_error(images, tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)  # a hub id must not resolve to a local folder
    make, expected = BAD_MODELS[case]
    model = make(tmp_path)
    out = tmp_path / "out"
    err = cli_error(capsys, capture_args(images, out, model=model))
    assert expected in err
    assert not out.exists()  # nothing was created
    err = cli_error(capsys, ["layers", "--model", model])
    assert expected in err
    from diffdissect import load_target

    with pytest.raises(ModelLoadError, match="."):
        load_target(model)


@pytest.mark.parametrize(
    "factory,expected",
    [
        ("_store_helpers:not_a_model", "returned a str, not an nn.Module"),
        ("_store_helpers:write_images", "failed when called with no arguments"),
        ("_store_helpers:no_such_factory", "cannot import"),
    ],
)
def test_bad_factory_is_a_clear_error(images, tmp_path, capsys, factory, expected):
    err = cli_error(capsys, capture_args(images, tmp_path / "out", model=factory))
    assert expected in err and factory.split(":")[1] in err
    assert not (tmp_path / "out").exists()


# ---- layers and timesteps -----------------------------------------------------------------------------------
def test_unknown_layer_lists_the_closest_valid_names(images, tmp_path, capsys):
    out = tmp_path / "out"
    err = cli_error(capsys, capture_args(images, out, "--layers", "mid", "blocks.9"))
    assert "layer 'blocks.9' is not a module of TinyDenoiser" in err
    assert "Closest valid names:" in err and "blocks.0" in err and "blocks.1" in err
    assert not out.exists()
    with pytest.raises(LayerNotFoundError, match="'midd'.*Closest valid names: mid"):
        from diffdissect import CaptureConfig, FolderSource, load_target
        from diffdissect.capture import capture

        capture(load_target(TINY_FACTORY), FolderSource(images), CaptureConfig(layers=["midd"]), out, progress=False)


@pytest.mark.parametrize("timesteps", [["1000"], ["-1"], ["10", "5000"]])
def test_timestep_out_of_range(images, tmp_path, capsys, timesteps):
    out = tmp_path / "out"
    err = cli_error(capsys, capture_args(images, out, "--timesteps", *timesteps))
    bad = next(t for t in timesteps if not 0 <= int(t) < 1000)
    assert f"timestep t={bad} is out of range" in err and "[0, 1000)" in err and "larger = noisier" in err
    assert not out.exists()


def test_timestep_out_of_range_api(images, tmp_path):
    from diffdissect import CaptureConfig, FolderSource, load_target
    from diffdissect.capture import capture

    for t in (-1, 1000):
        with pytest.raises(SpecError, match=rf"t={t} is out of range"):
            capture(
                load_target(TINY_FACTORY),
                FolderSource(images),
                CaptureConfig(layers=["mid"], timesteps=[t]),
                tmp_path / "out",
                progress=False,
            )
    assert not (tmp_path / "out").exists()


# ---- images -------------------------------------------------------------------------------------------------
def test_empty_image_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    err = cli_error(
        capsys,
        ["capture", "--model", TINY_FACTORY, "--images", str(empty), "--layers", "mid", "--out", str(out), "--quiet"],
    )
    assert f"no images found in {empty}" in err
    assert not out.exists()
    err = cli_error(
        capsys,
        [
            "capture",
            "--model",
            TINY_FACTORY,
            "--images",
            str(tmp_path / "missing"),
            "--layers",
            "mid",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert "does not exist" in err and "missing" in err
    from diffdissect import FolderSource

    with pytest.raises(DataError, match="no images found"):
        FolderSource(empty)


def _truncate_png(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_images_are_skipped_with_a_warning_and_counted(tmp_path, capsys):
    folder = write_images(tmp_path / "imgs", 6, corrupt=(2,))
    _truncate_png(folder / "img_0004.png")  # a real PNG, cut short
    out = tmp_path / "store"
    with pytest.warns(UserWarning, match="skipping unreadable input") as caught:
        with one_thread():
            assert main(capture_args(folder, out)) == 0
    warned = " ".join(str(w.message) for w in caught)
    assert "img_0002.png" in warned and "img_0004.png" in warned
    assert "2 unreadable inputs skipped" in capsys.readouterr().out

    manifest = Manifest.load(out)
    assert manifest.complete and [s["source_index"] for s in manifest.skipped] == [2, 4]
    assert all(f"img_{i:04d}.png" in s["reason"] for i, s in zip((2, 4), manifest.skipped))
    reader = open_store(out)
    assert reader.num_rows == 4 * 2 and [r["source_index"] for r in reader.rows()] == [0, 0, 1, 1, 3, 3, 5, 5]
    assert main(["store", "info", str(out)]) == 0
    assert "skipped     2 unreadable inputs" in capsys.readouterr().out
    assert main(["store", "info", str(out), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 2
    assert verify_store(out).ok


def test_only_corrupt_images_is_an_error(tmp_path, capsys):
    folder = write_images(tmp_path / "imgs", 3, corrupt=(0, 1, 2))
    with pytest.warns(UserWarning):
        err = cli_error(capsys, capture_args(folder, tmp_path / "store"))
    assert "none of the 3 inputs could be read (3 skipped)" in err


# ---- resuming with a different spec --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,field",
    [
        (("--timesteps", "10", "700"), "capture.timesteps"),
        (("--layers", "mid"), "capture.layers"),
        (("--seeds", "0"), "capture.seeds"),
        (("--random-init", "--init-seed", "3"), "model.weights_fingerprint"),
    ],
)
def test_resume_with_a_different_spec_is_refused(images, reference, tmp_path, capsys, change, field):
    store = copy_store(reference, tmp_path / "store")
    before, stats = snapshot(store), file_stats(store)
    err = cli_error(capsys, capture_args(images, store, *change))
    assert "holds a capture made with a different spec" in err and field in err and "Refusing to mix" in err
    assert snapshot(store) == before and file_stats(store) == stats


# ---- NaN / inf, float16 overflow ----------------------------------------------------------------------------
def test_nan_activations_are_reported_with_layer_and_t_and_committed_shards_survive(tmp_path, capsys):
    folder = write_images(tmp_path / "imgs", 8, bright=(6,))  # nan_denoiser: layer `bad` is NaN for it
    out = tmp_path / "store"
    argv = capture_args(
        folder, out, "--layers", "good", "bad", "--timesteps", "600", "10", model="_store_helpers:nan_denoiser"
    )
    err = cli_error(capsys, argv)
    assert "layer 'bad' at t=10 produced NaN/inf activations" in err and "img_0006.png" in err
    assert "'good'" not in err and "t=600" not in err
    manifest = Manifest.load(out)  # images 0..5 were captured and kept
    assert not manifest.complete
    assert [s.name for s in manifest.shards] == [f"shard-{i:06d}.safetensors" for i in range(3)]
    assert sorted(p.name for p in (out / "shards").iterdir()) == [s.name for s in manifest.shards]
    report = verify_store(out)
    assert report.ok and report.shards_checked == 3
    for t in (10, 600):
        assert np.isfinite(open_store(out).load("bad", t)).all()


def test_float16_overflow_suggests_a_wider_dtype(images, tmp_path, capsys):
    model = "_store_helpers:huge_denoiser"  # layer `huge` outputs 1e6
    out16 = tmp_path / "f16"
    err = cli_error(capsys, capture_args(images, out16, "--layers", "good", "huge", model=model))
    assert "layer 'huge' at t=10" in err and "1e+06" in err and "float16" in err
    assert "--dtype bfloat16 or float32" in err
    assert Manifest.load(out16).shards == []  # nothing half-written
    out32 = tmp_path / "f32"
    assert run_cli(images, out32, "--layers", "good", "huge", "--dtype", "float32", model=model) == 0
    values = open_store(out32).load("huge", 10)
    assert values.dtype == np.float32 and np.all(values == 1e6)


def test_a_capture_that_failed_before_its_first_shard_can_be_rerun_corrected_in_place(images, tmp_path, capsys):
    model = "_store_helpers:huge_denoiser"
    out = tmp_path / "acts"
    cli_error(capsys, capture_args(images, out, "--layers", "good", "huge", model=model))
    assert Manifest.load(out).shards == []  # the failed run held no data
    assert run_cli(images, out, "--layers", "good", "huge", "--dtype", "float32", model=model) == 0
    assert Manifest.load(out).complete and open_store(out).load("huge", 10).dtype == np.float32
    # once a store holds data, a different spec is refused again
    err = cli_error(capsys, capture_args(images, out, "--layers", "good", model=model))
    assert "different spec" in err


# ---- running out of disk ------------------------------------------------------------------------------------
class _DiskFullFile:
    """A file whose write stores half the data, then fails like a full disk."""

    def __init__(self, fh, record: dict):
        self.fh, self.record = fh, record

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        self.record["partial"] = Path(self.fh.name)
        self.record["partial_bytes"] = Path(self.fh.name).stat().st_size
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        self.fh.flush()

    def fileno(self):
        return self.fh.fileno()


def test_out_of_disk_leaves_no_partial_shard_and_resumes(images, reference, tmp_path, capsys):
    import builtins

    import diffdissect.atomic as atomic

    record: dict = {}

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        fh = builtins.open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).name.startswith(".shard-000003.safetensors"):
            return _DiskFullFile(fh, record)
        return fh

    out = tmp_path / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atomic, "open", open_on_a_full_disk, raising=False)
        err = cli_error(capsys, capture_args(images, out))
    assert record["partial_bytes"] > 0  # a partial file really was on disk
    assert "ran out of disk space while writing shard-000003.safetensors" in err and "resume" in err
    assert not record["partial"].exists()
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"shard-{i:06d}.safetensors" for i in range(3)]
    manifest = Manifest.load(out)
    assert not manifest.complete and [s.name for s in manifest.shards] == [
        f"shard-{i:06d}.safetensors" for i in range(3)
    ]
    report = verify_store(out)
    assert report.ok and report.shards_checked == 3
    for i in range(3):  # committed shards are intact
        name = f"shards/shard-{i:06d}.safetensors"
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert main(["store", "verify", str(out)]) == 0
    capsys.readouterr()
    # disk space freed: the same command resumes to exactly the uninterrupted result
    assert run_cli(images, out) == 0
    assert_same_store(out, reference)


# ---- --out in the way ---------------------------------------------------------------------------------------
def test_out_is_a_non_empty_directory_that_is_no_store(images, tmp_path, capsys):
    out = tmp_path / "my-results"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01precious")
    before, stats = snapshot(out), file_stats(out)
    err = cli_error(capsys, capture_args(images, out))
    assert "is not empty and is not an activation store" in err and "refusing" in err
    assert snapshot(out) == before and file_stats(out) == stats
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["notes.txt", "sub", "sub/data.bin"]


def test_out_is_a_file(images, tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("precious")
    err = cli_error(capsys, capture_args(images, out))
    assert "is a file" in err
    assert out.read_text() == "precious"


@pytest.mark.parametrize(
    "content,expected",
    [('{"name": "someone else\'s"}', "not a diffdissect store manifest"), ('{"format": "diffdissect-st', "unreadable")],
)
def test_out_holds_a_foreign_or_broken_manifest(images, tmp_path, capsys, content, expected):
    out = tmp_path / "other"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    (out / "keep.txt").write_text("precious")
    before, stats = snapshot(out), file_stats(out)
    err = cli_error(capsys, capture_args(images, out))
    assert expected in err
    assert snapshot(out) == before and file_stats(out) == stats
