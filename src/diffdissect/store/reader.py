"""Streaming reads of (layer, t) slices, a shard at a time, in order or shuffled."""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open

from diffdissect.errors import StoreError
from diffdissect.store.integrity import check_block, check_checksum, check_rows, shard_path
from diffdissect.store.manifest import FORMAT_VERSION, Manifest, ShardRecord, slice_key

ArrayFormat = Literal["numpy", "torch"]


def open_store(directory: Path | str) -> StoreReader:
    """Open an activation store for reading."""
    return StoreReader(Path(directory))


class StoreReader:
    """Read-only view of a store. Memory stays bounded by one shard's slice."""

    def __init__(self, directory: Path, manifest: Manifest | None = None):
        self.directory = Path(directory)
        self.manifest = manifest or Manifest.load(self.directory)
        for shard in self.manifest.shards:          # names and counts on open; checksums when a shard is first read
            shard_path(self.directory, shard.name)
        if self.manifest.format_version < FORMAT_VERSION:
            warnings.warn(f"{self.directory} is a store of format {self.manifest.format_version}, written before "
                          "full-content model and image identities (format 2): it is read as it is, but it cannot "
                          "be resumed, and it cannot prove which model weights or image bytes it came from.",
                          stacklevel=2)

    # ---- description -------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.manifest.layers)

    @property
    def timesteps(self) -> list[int]:
        return self.manifest.timestep_values

    @property
    def num_rows(self) -> int:
        return self.manifest.rows

    def shape(self, layer: str) -> tuple[int, ...]:
        """Per-row shape of a layer's slice, e.g. (1280,) pooled or (1280, 8, 8) spatial."""
        self.manifest.check_slice(layer, self.timesteps[0])
        return tuple(self.manifest.layers[layer]["shape"])

    def rows(self) -> list[dict[str, Any]]:
        """The row index: one dict per row (row, input_id, source_index, seed, label, caption, shard)."""
        return self._rows

    @cached_property
    def _rows(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for shard in self.manifest.shards:
            path = self._checked(shard)
            try:
                with safe_open(path, framework="pt") as fh:
                    meta = fh.metadata() or {}
                rows = json.loads(meta.get("rows", "[]"))
            except Exception as exc:   # safetensors raises its own error types for corrupt headers
                raise StoreError(f"shard {shard.name} could not be read ({exc}); run the same capture again to "
                                 "rewrite it.") from exc
            check_rows(rows, shard)
            for r in rows:
                out.append({"row": len(out), **r, "shard": shard.name})
        return out

    def column(self, name: str) -> list[Any]:
        """One column of the row index, e.g. ``reader.column("label")``."""
        return [r.get(name) for r in self.rows()]

    # ---- data --------------------------------------------------------------------------------
    def iter_batches(self, layer: str, t: int, batch_size: int = 1024, *, shuffle: bool = False,
                     seed: int = 0, format: ArrayFormat = "numpy", with_rows: bool = False,
                     dtype: str | None = None) -> Iterator[Any]:
        """Yield batches of the (layer, t) slice.

        In order, batches follow the row index. Shuffled, shard order and the rows inside each shard
        are permuted with `seed` (a shard-local shuffle: memory stays at one shard). With
        ``with_rows=True`` each item is ``(batch, row_ids)``.
        """
        self.manifest.check_slice(layer, t)
        rng = np.random.default_rng(seed)
        shards = list(self._shard_offsets())
        if shuffle:
            shards = [shards[i] for i in rng.permutation(len(shards))]
        key = slice_key(layer, t)
        pending: list[torch.Tensor] = []
        pending_ids: list[np.ndarray] = []
        count = 0
        for shard, offset in shards:
            if shard.rows == 0:
                continue
            block = self._read(shard, key)
            ids = np.arange(offset, offset + shard.rows)
            if shuffle:
                order = rng.permutation(shard.rows)
                block, ids = block[torch.from_numpy(order)], ids[order]
            for start in range(0, shard.rows, batch_size):
                pending.append(block[start:start + batch_size])
                pending_ids.append(ids[start:start + batch_size])
                count += len(pending_ids[-1])
                while count >= batch_size:
                    batch, bids, pending, pending_ids, count = _take(pending, pending_ids, batch_size)
                    yield self._emit(batch, bids, format, with_rows, dtype)
        if count:
            batch, bids, *_ = _take(pending, pending_ids, count)
            yield self._emit(batch, bids, format, with_rows, dtype)

    def load(self, layer: str, t: int, *, format: ArrayFormat = "numpy", dtype: str | None = None) -> Any:
        """The whole (layer, t) slice in row order. For slices that fit in memory (pooled features)."""
        self.manifest.check_slice(layer, t)
        key = slice_key(layer, t)
        parts = [self._read(s, key) for s, _ in self._shard_offsets() if s.rows]
        if not parts:
            block = torch.empty((0, *self.manifest.layers[layer]["shape"]))
        else:
            block = torch.cat(parts)
        return self._emit(block, None, format, False, dtype)

    # ---- internals ---------------------------------------------------------------------------
    def _shard_offsets(self) -> Iterator[tuple[ShardRecord, int]]:
        offset = 0
        for shard in self.manifest.shards:
            yield shard, offset
            offset += shard.rows

    def _path(self, shard: ShardRecord) -> Path:
        return shard_path(self.directory, shard.name)

    def _checked(self, shard: ShardRecord) -> Path:
        """The shard's path once its size and checksum match the manifest (hashed once per file version)."""
        path = self._path(shard)
        check_checksum(path, shard)
        return path

    def _read(self, shard: ShardRecord, key: str) -> torch.Tensor:
        path = self._checked(shard)
        try:
            with safe_open(path, framework="pt") as fh:
                block = fh.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise StoreError(f"shard {shard.name} could not be read ({exc}); run `diffdissect store verify`.") from exc
        check_block(block, shard, key)
        return block

    @staticmethod
    def _emit(batch: torch.Tensor, ids: np.ndarray | None, format: ArrayFormat, with_rows: bool,
              dtype: str | None) -> Any:
        if dtype is not None:
            batch = batch.to(getattr(torch, dtype))
        if format == "numpy":
            out: Any = (batch.float() if batch.dtype == torch.bfloat16 else batch).numpy()
        elif format == "torch":
            out = batch
        else:
            raise ValueError(f"format must be 'numpy' or 'torch', not {format!r}")
        return (out, ids) if with_rows else out


def _take(pending: list[torch.Tensor], pending_ids: list[np.ndarray], n: int):
    batch, ids = torch.cat(pending), np.concatenate(pending_ids)
    head, tail = batch[:n], batch[n:]
    head_ids, tail_ids = ids[:n], ids[n:]
    rest = [tail] if len(tail) else []
    rest_ids = [tail_ids] if len(tail_ids) else []
    return head, head_ids, rest, rest_ids, len(tail_ids)
