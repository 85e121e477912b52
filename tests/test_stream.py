"""The store stream (store/stream.py): mixing across shards, every item once, determinism, bounded memory."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdissect.errors import StoreError
from diffdissect.sae.data import to_tokens
from diffdissect.store import open_store
from diffdissect.store.from_arrays import write_array_store
from diffdissect.store.stream import MixingStream, plan_pools

CLASSES = 4


@pytest.fixture(scope="module")
def sorted_store(tmp_path_factory) -> Path:
    """256 rows written in sorted class order: 16 shards of 16 rows, shards 0-3 all class 0, 4-7 class 1, ..."""
    n = 256
    labels = np.repeat(np.arange(CLASSES), n // CLASSES)
    x = np.random.default_rng(0).normal(size=(n, 6)).astype(np.float32)
    x[:, 0] = labels  # the class can be read off a row
    rows = [{"input_id": f"img{i}", "label": str(labels[i])} for i in range(n)]
    path = tmp_path_factory.mktemp("stream") / "store"
    write_array_store(path, {("blk", 5): x}, rows, shard_rows=16, dtype="float32")
    return path


@pytest.fixture(scope="module")
def spatial_store(tmp_path_factory) -> Path:
    x = np.random.default_rng(1).normal(size=(40, 5, 2, 3)).astype(np.float32)
    path = tmp_path_factory.mktemp("stream") / "spatial"
    write_array_store(path, {("blk", 5): x}, [{"input_id": f"i{i}"} for i in range(40)], shard_rows=6, dtype="float16")
    return path


def batches(store: Path, batch: int, **kwargs) -> list[torch.Tensor]:
    stream = MixingStream(open_store(store), "blk", 5, batch, **kwargs)
    try:
        return list(stream)
    finally:
        stream.close()


def test_a_store_in_sorted_class_order_gives_batches_with_the_stores_class_mix(sorted_store):
    """Issue 18's defect 5: with a buffer of 2 shards (of 16), each batch's class mix is close to the store's
    (1/4 each). A shard-local shuffle would give one class per batch (a deviation of 0.75)."""
    out = batches(sorted_store, 16, mix_shards=2, seed=3, epochs=2)
    assert len(out) == 2 * 256 // 16
    shares = np.stack([np.bincount(b[:, 0].long().numpy(), minlength=CLASSES) / len(b) for b in out])
    deviation = np.abs(shares - 1 / CLASSES)
    assert deviation.mean() < 0.08 and deviation.max() <= 0.25, shares
    assert (shares > 0).all()  # every class in every batch


def test_every_item_exactly_once_per_epoch_and_deterministic(sorted_store):
    reader = open_store(sorted_store)
    full = torch.from_numpy(reader.load("blk", 5))
    out = batches(sorted_store, 10, mix_shards=3, seed=7, with_rows=True, drop_last=False)
    ids = np.concatenate([i for _, i in out])
    assert sorted(ids.tolist()) == list(range(256)) and ids.tolist() != sorted(ids.tolist())
    for items, rows in out:
        assert torch.equal(items, full[rows])
    again = batches(sorted_store, 10, mix_shards=3, seed=7, with_rows=True, drop_last=False)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(out, again, strict=True))
    other = batches(sorted_store, 10, mix_shards=3, seed=8, with_rows=True, drop_last=False)
    assert not np.array_equal(ids, np.concatenate([i for _, i in other]))
    synchronous = batches(sorted_store, 10, mix_shards=3, seed=7, with_rows=True, drop_last=False, prefetch=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(out, synchronous, strict=True))


def test_tokens_are_every_location_of_the_selected_rows_in_the_training_dtype(spatial_store):
    reader = open_store(spatial_store)
    select = np.arange(40) % 5 != 0
    expected = to_tokens(torch.from_numpy(reader.load("blk", 5))[torch.from_numpy(select)].float(), True)
    out = torch.cat(batches(spatial_store, 7, tokens=True, select=select, dtype=torch.float32, drop_last=False))
    assert out.dtype == torch.float32 and out.shape == expected.shape

    def order(x: torch.Tensor) -> torch.Tensor:
        return x[torch.from_numpy(np.lexsort(x.numpy().T[::-1].copy()))]

    assert torch.equal(order(out), order(expected))


def test_skipped_batches_are_the_first_ones(sorted_store):
    whole = batches(sorted_store, 12, seed=2, epochs=2)
    resumed = batches(sorted_store, 12, seed=2, epochs=2, skip=9)
    assert len(resumed) == len(whole) - 9 and all(torch.equal(a, b) for a, b in zip(whole[9:], resumed))


def test_memory_stays_at_a_few_pools_however_big_the_store(sorted_store):
    stream = MixingStream(open_store(sorted_store), "blk", 5, 8, mix_shards=1, epochs=1)
    list(stream)
    held = [b.numel() for b in stream._ring if b is not None]
    pool_values = 16 * 6  # one shard's rows x 6 features
    assert len(held) <= 3 and max(held) <= 1.5 * pool_values and sum(held) <= 256 * 6 / 4
    stream.close()


def test_pools_take_row_ranges_from_every_shard():
    rng = np.random.default_rng(0)
    selected = [np.arange(16) for _ in range(16)]
    pools = plan_pools(selected, row_bytes=24, pool_rows=32, rng=rng)
    assert len(pools) == 8 and all(sorted(p.shard for p in pool) == list(range(16)) for pool in pools)
    assert sorted(
        r for pool in pools for p in pool for a, b in p.runs for r in range(a + 16 * p.shard, b + 16 * p.shard)
    ) == list(range(256))


def test_a_read_error_reaches_the_consumer_and_the_thread_ends(sorted_store, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sorted_store, broken)
    (broken / "shards" / "shard-000003.safetensors").unlink()
    before = threading.active_count()
    stream = MixingStream(open_store(broken), "blk", 5, 8)
    with pytest.raises(StoreError, match="shard-000003"):
        list(stream)
    stream.close()
    assert threading.active_count() <= before
