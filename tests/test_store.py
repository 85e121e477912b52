"""The activation store: streaming reads, the row index, `store info` and `store verify`.

The stores here are captured (through the library API) from `ProbeDenoiser`, whose layer `inp` is the
noised input itself: at t=0 a mean-pooled row is the image's flat colour, so the data says which image a
row came from, independently of the row index. 11 images, one of them corrupt (skipped), 2 seeds, 3 images
per shard: shards of 6, 4, 6 and 4 rows (20 rows).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from _store_helpers import copy_store, flat_colour, one_thread, probe_denoiser, write_images
from diffdissect.cli import main
from diffdissect.errors import StoreError
from diffdissect.store import open_store, verify_store

N_IMAGES, CORRUPT = 11, 4
LAYERS, TIMESTEPS, SEEDS, SHARD_SIZE = ["inp", "mid"], [0, 500], [0, 1], 3
READABLE = [i for i in range(N_IMAGES) if i != CORRUPT]
N_ROWS = len(READABLE) * len(SEEDS)  # 20
SHARD_ROWS = [6, 4, 6, 4]
SLICES = [(layer, t) for layer in LAYERS for t in TIMESTEPS]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def capture_probe(images: Path, out: Path, **spec_kwargs):
    from diffdissect import CaptureConfig, FolderSource, load_target
    from diffdissect.capture import capture

    spec = CaptureConfig(
        **{
            "layers": LAYERS,
            "timesteps": TIMESTEPS,
            "seeds": SEEDS,
            "shard_size": SHARD_SIZE,
            "batch_size": 2,
            **spec_kwargs,
        }
    )
    with one_thread(), pytest.warns(UserWarning, match=f"img_{CORRUPT:04d}.png"):
        return capture(
            load_target(probe_denoiser()), FolderSource(images, images / "labels.csv"), spec, out, progress=False
        )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("store-images"), N_IMAGES, corrupt=(CORRUPT,))


@pytest.fixture(scope="module")
def store(images, tmp_path_factory) -> Path:
    """float16, mean-pooled. Read-only: copy it before damaging it."""
    out = tmp_path_factory.mktemp("stores") / "f16"
    capture_probe(images, out)
    return out


@pytest.fixture(scope="module")
def bf16_store(images, tmp_path_factory) -> Path:
    """bfloat16, unpooled (full 4x8x8 maps for `mid`)."""
    out = tmp_path_factory.mktemp("stores") / "bf16"
    capture_probe(images, out, dtype="bfloat16", pooling="none")
    return out


def test_store_layout(store):
    reader = open_store(store)
    assert reader.manifest.complete
    assert [s.rows for s in reader.manifest.shards] == SHARD_ROWS
    assert [s.name for s in reader.manifest.shards] == [f"shard-{i:06d}.safetensors" for i in range(4)]
    assert sorted(p.name for p in (store / "shards").iterdir()) == [s.name for s in reader.manifest.shards]
    assert reader.num_rows == N_ROWS and reader.layers == LAYERS and reader.timesteps == TIMESTEPS
    assert reader.shape("inp") == (3,) and reader.shape("mid") == (4,)


# ---- streaming ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["numpy", "torch"])
@pytest.mark.parametrize("batch_size", [1, 4, 5, 7, 20, 64])
def test_in_order_batches_concatenate_to_load(store, batch_size, fmt):
    reader = open_store(store)
    for layer, t in SLICES:
        full = reader.load(layer, t, format=fmt)
        batches = list(reader.iter_batches(layer, t, batch_size=batch_size, format=fmt))
        sizes = [len(b) for b in batches]
        assert sizes == [batch_size] * (N_ROWS // batch_size) + ([N_ROWS % batch_size] if N_ROWS % batch_size else [])
        if fmt == "numpy":
            assert isinstance(full, np.ndarray) and full.dtype == np.float16
            assert all(isinstance(b, np.ndarray) and b.dtype == np.float16 for b in batches)
            np.testing.assert_array_equal(np.concatenate(batches), full)
        else:
            assert isinstance(full, torch.Tensor) and full.dtype == torch.float16
            assert all(isinstance(b, torch.Tensor) and b.dtype == torch.float16 for b in batches)
            assert torch.equal(torch.cat(batches), full)
        assert full.shape == (N_ROWS, *reader.shape(layer))


def test_in_order_with_rows_ids_match_data(store):
    reader = open_store(store)
    full = reader.load("mid", 500)
    seen = []
    for batch, ids in reader.iter_batches("mid", 500, batch_size=7, with_rows=True):
        assert len(batch) == len(ids)
        np.testing.assert_array_equal(batch, full[ids])
        seen.extend(ids.tolist())
    assert seen == list(range(N_ROWS))


@pytest.mark.parametrize("batch_size", [3, 8, 64])
def test_shuffled_is_a_deterministic_permutation(store, batch_size):
    reader = open_store(store)
    full = reader.load("mid", 500, format="torch")

    def shuffled(seed):
        ids, data = [], []
        for batch, bids in reader.iter_batches(
            "mid", 500, batch_size=batch_size, shuffle=True, seed=seed, format="torch", with_rows=True
        ):
            assert torch.equal(batch, full[torch.from_numpy(bids)])  # ids name the rows they came with
            ids.extend(bids.tolist())
            data.append(batch)
        return ids, torch.cat(data)

    ids0, data0 = shuffled(0)
    assert sorted(ids0) == list(range(N_ROWS)) and ids0 != list(range(N_ROWS))
    ids0_again, data0_again = shuffled(0)
    assert ids0_again == ids0 and torch.equal(data0_again, data0)
    ids1, _ = shuffled(1)
    assert sorted(ids1) == list(range(N_ROWS)) and ids1 != ids0
    # and a fresh reader (another process, another day) gives the same order for the same seed
    assert [
        i
        for _, b in open_store(store).iter_batches(
            "mid", 500, batch_size=batch_size, shuffle=True, seed=0, with_rows=True
        )
        for i in b.tolist()
    ] == ids0


def test_bfloat16_store_reads_as_numpy(bf16_store):
    reader = open_store(bf16_store)
    assert reader.manifest.dtype == "bfloat16" and reader.shape("mid") == (4, 8, 8)
    as_torch = reader.load("mid", 500, format="torch")
    assert as_torch.dtype == torch.bfloat16 and as_torch.shape == (N_ROWS, 4, 8, 8)
    as_numpy = reader.load("mid", 500)  # numpy has no bfloat16: float32, exact
    assert as_numpy.dtype == np.float32
    np.testing.assert_array_equal(as_numpy, as_torch.float().numpy())
    batches = list(reader.iter_batches("mid", 500, batch_size=6))
    assert all(b.dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), as_numpy)
    as_f32 = next(reader.iter_batches("mid", 500, batch_size=6, format="torch", dtype="float32"))
    assert as_f32.dtype == torch.float32 and torch.equal(as_f32, as_torch[:6].float())


def test_float16_and_bfloat16_stores_hold_the_same_activations(store, bf16_store):
    pooled16 = open_store(store).load("mid", 500).astype(np.float32)
    maps_bf16 = open_store(bf16_store).load("mid", 500)
    np.testing.assert_allclose(maps_bf16.mean(axis=(2, 3)), pooled16, atol=0.05)


@pytest.mark.parametrize("dtype", [None, "float32"])
@pytest.mark.parametrize("batch_size", [2, 5, 7])
def test_streaming_reads_one_shard_at_a_time(store, batch_size, dtype):
    """In order, iter_batches reads lazily, shard after shard (a file read straight into the batch, or a copy
    from the mapped file when converting), never going back to an earlier shard."""
    reader = open_store(store)
    real_view, real_read = reader.view, reader.read_into
    reads: list[str] = []

    def view(shard, key):
        reads.append(shard.name)
        return real_view(shard, key)

    def read_into(shard, key, a, b, out):
        reads.append(shard.name)
        assert key == "mid@t=500" and 0 <= a < b <= shard.rows and len(out) == b - a
        return real_read(shard, key, a, b, out)

    reader.view, reader.read_into = view, read_into
    batches = reader.iter_batches("mid", 500, batch_size=batch_size, dtype=dtype)
    first = next(batches)
    rows = {s.name: s.rows for s in reader.manifest.shards}
    distinct = list(dict.fromkeys(reads))
    # lazy: the first batch reads only the shards it needs
    assert sum(rows[n] for n in distinct) >= batch_size > sum(rows[n] for n in distinct[:-1])
    rest = list(batches)
    assert 1 + len(rest) == -(-N_ROWS // batch_size)
    in_turn = [n for i, n in enumerate(reads) if i == 0 or reads[i - 1] != n]
    assert in_turn == [s.name for s in reader.manifest.shards]  # every shard, in order, never revisited
    np.testing.assert_array_equal(np.concatenate([first, *rest]), reader.load("mid", 500, dtype=dtype))


@pytest.mark.parametrize("batch_size", [2, 5, 7])
def test_shuffled_reads_give_every_row_once(store, batch_size):
    reader = open_store(store)
    expected = reader.load("mid", 500)
    seen = []
    for batch, ids in reader.iter_batches("mid", 500, batch_size=batch_size, shuffle=True, seed=3, with_rows=True):
        np.testing.assert_array_equal(batch, expected[ids])
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(N_ROWS)) and seen != sorted(seen)


def test_load_names_a_missing_shard(store, tmp_path):
    damaged = copy_store(store, tmp_path / "s")
    (damaged / "shards" / "shard-000002.safetensors").unlink()
    reader = open_store(damaged)
    with pytest.raises(StoreError, match="shard-000002.safetensors"):
        reader.load("mid", 500)
    with pytest.raises(StoreError, match="shard-000002.safetensors"):
        list(reader.iter_batches("mid", 500, batch_size=4))


def test_unknown_slice_is_refused(store):
    reader = open_store(store)
    with pytest.raises(StoreError, match="stored layers"):
        reader.load("nope", 0)
    with pytest.raises(StoreError, match=r"t=7 .*stored timesteps: \[0, 500\]"):
        list(reader.iter_batches("mid", 7))


# ---- the row index --------------------------------------------------------------------------------------
def expected_rows(images: Path | None = None) -> list[dict]:
    import hashlib

    rows = []
    for i in READABLE:
        for seed in SEEDS:
            rows.append(
                {
                    "row": len(rows),
                    "input_id": f"img_{i:04d}.png",
                    "source_index": i,
                    "seed": seed,
                    "label": f"class{i % 3}",
                    "caption": f"caption {i}",
                    "shard": f"shard-{i // SHARD_SIZE:06d}.safetensors",
                }
            )
            if images is not None:  # each row records the bytes it was captured from (issue 21: thumbnails)
                rows[-1]["image_sha256"] = hashlib.sha256((images / f"img_{i:04d}.png").read_bytes()).hexdigest()
    return rows


def test_rows_follow_input_then_seed_order(store, images):
    reader = open_store(store)
    assert reader.rows() == expected_rows(images)
    assert reader.column("seed") == [0, 1] * len(READABLE)
    with open(store / "index.csv", newline="") as fh:
        index = list(csv.DictReader(fh))
    assert index == [{k: str(v) for k, v in r.items()} for r in expected_rows(images)]


def test_rows_and_data_agree(store):
    """Row r of every slice is the input that the row index names: at t=0 layer `inp` is its colour."""
    reader = open_store(store)
    pooled = reader.load("inp", 0).astype(np.float32)
    for r, row in enumerate(reader.rows()):
        colour = np.array(flat_colour(row["source_index"]), dtype=np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(pooled[r], colour, atol=0.02, err_msg=f"row {r} ({row['input_id']})")
    # the two seeds of one input are different noise draws: visible at a noisy t
    noisy = reader.load("inp", 500).astype(np.float32)
    assert not np.allclose(noisy[0::2], noisy[1::2], atol=1e-3)


# ---- store info -----------------------------------------------------------------------------------------
def test_store_info(store, capsys):
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    assert main(["store", "info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "(complete)" in out
    assert re.search(r"rows\s+20 in 4 shards", out)
    assert re.search(r"skipped\s+1 unreadable", out)
    assert "dtype float16" in out
    for t in TIMESTEPS:
        ab = float(alphas[t])
        # then the denoiser's t (issue 16), "-" where a store's table has none
        assert re.search(rf"^\s+{t} \| {ab:.4f} \| {(1 - ab) ** 0.5:.4f} \|\s+(-|{t}\.0000)$", out, re.M), out
    assert re.search(r"inp: 3$", out, re.M) and re.search(r"mid: 4$", out, re.M)

    assert main(["store", "info", str(store), "--json", "-"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["rows"], info["shards"], info["skipped"], info["complete"]) == (N_ROWS, 4, 1, True)
    assert [e["t"] for e in info["timesteps"]] == TIMESTEPS
    for e in info["timesteps"]:
        assert e["alpha_bar"] == pytest.approx(float(alphas[e["t"]]))
        assert e["noise_std"] == pytest.approx((1 - float(alphas[e["t"]])) ** 0.5)
    assert info["timesteps"][0]["alpha_bar"] > info["timesteps"][1]["alpha_bar"]  # larger t = noisier
    assert info["layers"] == {"inp": {"shape": [3], "dtype": "float16"}, "mid": {"shape": [4], "dtype": "float16"}}


def test_store_info_on_a_non_store(tmp_path, capsys):
    assert main(["store", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffdissect: error:") and "manifest.json is missing" in err


# ---- store verify ---------------------------------------------------------------------------------------
def test_verify_passes_on_a_good_store(store, capsys):
    assert main(["store", "verify", str(store)]) == 0
    out = capsys.readouterr().out
    assert "4 shards checked: OK" in out and "BAD" not in out and "warning" not in out
    assert verify_store(store).ok


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x01  # inside the tensor data: same size, same header
    path.write_bytes(bytes(data))


def _flip_header_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[12] ^= 0x20  # inside the JSON header
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (_truncate, "truncated"),
    "bit-flipped": (_flip_bit, "checksum mismatch"),
    "header-flipped": (_flip_header_bit, "checksum mismatch"),
    "missing": (Path.unlink, "missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_names_a_damaged_shard(store, tmp_path, capsys, damage):
    damaged = copy_store(store, tmp_path / "s")
    name = "shard-000001.safetensors"
    size = (damaged / "shards" / name).stat().st_size
    how, what = DAMAGE[damage]
    how(damaged / "shards" / name)
    if damage.endswith("flipped"):
        assert (damaged / "shards" / name).stat().st_size == size
    assert main(["store", "verify", str(damaged)]) == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and name in bad[0] and what in bad[0], out
    assert "4 shards checked: 1 bad" in out
    report = verify_store(damaged)
    assert report.bad_shards == [name] and not report.ok


def test_verify_names_every_damaged_shard(store, tmp_path, capsys):
    damaged = copy_store(store, tmp_path / "s")
    _truncate(damaged / "shards" / "shard-000000.safetensors")
    _flip_bit(damaged / "shards" / "shard-000002.safetensors")
    (damaged / "shards" / "shard-000003.safetensors").unlink()
    assert main(["store", "verify", str(damaged)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^BAD shard-000000.safetensors: truncated", out, re.M)
    assert re.search(r"^BAD shard-000002.safetensors: checksum mismatch", out, re.M)
    assert re.search(r"^BAD shard-000003.safetensors: missing", out, re.M)
    assert "shard-000001" not in out and "4 shards checked: 3 bad" in out


def test_verify_detects_a_shard_swapped_for_another(store, tmp_path, capsys):
    """Two shards of the same size swapped: sizes match, checksums do not."""
    damaged = copy_store(store, tmp_path / "s")
    a, b = damaged / "shards" / "shard-000000.safetensors", damaged / "shards" / "shard-000002.safetensors"
    da, db = a.read_bytes(), b.read_bytes()
    assert len(da) == len(db) and da != db
    a.write_bytes(db)
    b.write_bytes(da)
    assert main(["store", "verify", str(damaged)]) == 1
    assert verify_store(damaged).bad_shards == ["shard-000000.safetensors", "shard-000002.safetensors"]


def test_verify_warns_about_uncommitted_and_leftover_files(store, tmp_path, capsys):
    s = copy_store(store, tmp_path / "s")
    (s / "shards" / "shard-000007.safetensors").write_bytes((s / "shards" / "shard-000000.safetensors").read_bytes())
    (s / "shards" / ".shard-000004.safetensors.4242.tmp").write_bytes(b"partial")
    (s / ".manifest.json.4242.tmp").write_bytes(b'{"partial')
    assert main(["store", "verify", str(s)]) == 0  # warnings, not problems: committed data is fine
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert any("shard-000007.safetensors" in w and "not listed" in w for w in warnings), out
    assert any(".shard-000004.safetensors.4242.tmp" in w and "leftover" in w for w in warnings), out
    assert any(".manifest.json.4242.tmp" in w and "leftover" in w for w in warnings), out
    assert "BAD" not in out and "4 shards checked: OK" in out


def test_verify_warns_about_an_incomplete_capture(store, tmp_path, capsys):
    s = copy_store(store, tmp_path / "s")
    manifest = json.loads((s / "manifest.json").read_text())
    manifest["complete"] = False
    (s / "manifest.json").write_text(json.dumps(manifest))
    assert main(["store", "verify", str(s)]) == 0
    assert "capture is not complete" in capsys.readouterr().out
    assert main(["store", "info", str(s)]) == 0
    assert "INCOMPLETE" in capsys.readouterr().out
