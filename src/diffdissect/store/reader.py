"""Streaming reads of (layer, t) slices, a shard at a time, in order or shuffled."""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open

from diffdissect.errors import StoreError
from diffdissect.store.integrity import check_block, check_checksum, check_finite, check_rows, shard_path
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
        for shard in self.manifest.shards:  # names and counts on open; checksums when a shard is first read
            shard_path(self.directory, shard.name)
        if self.manifest.format_version < FORMAT_VERSION:
            warnings.warn(
                f"{self.directory} is a store of format {self.manifest.format_version}, written before "
                "full-content model and image identities (format 2): it is read as it is, but it cannot "
                "be resumed, and it cannot prove which model weights or image bytes it came from.",
                stacklevel=2,
            )
        self._headers: dict[tuple[str, int, int], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]] = {}
        self._finite: set[tuple[str, str, str]] = set()

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
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise StoreError(
                    f"shard {shard.name} could not be read ({exc}); run the same capture again to rewrite it."
                ) from exc
            check_rows(rows, shard)
            for r in rows:
                out.append({"row": len(out), **r, "shard": shard.name})
        return out

    def column(self, name: str) -> list[Any]:
        """One column of the row index, e.g. ``reader.column("label")``."""
        return [r.get(name) for r in self.rows()]

    # ---- data --------------------------------------------------------------------------------
    def iter_batches(
        self,
        layer: str,
        t: int,
        batch_size: int = 1024,
        *,
        shuffle: bool = False,
        seed: int = 0,
        format: ArrayFormat = "numpy",
        with_rows: bool = False,
        dtype: str | None = None,
        select: np.ndarray | None = None,
        mix_shards: int = 1,
    ) -> Iterator[Any]:
        """Yield batches of the (layer, t) slice (the rows where `select` is true, if given).

        In order, batches follow the row index. Shuffled, rows are drawn with `seed` from pools of about
        `mix_shards` shards' rows, each pool taking row ranges of every shard (`store.stream`): memory
        stays at a few shards. With ``with_rows=True`` each item is ``(batch, row_ids)``. Every batch is
        its own tensor (never a view of the file).
        """
        self.manifest.check_slice(layer, t)
        if format not in ("numpy", "torch"):
            raise ValueError(f"format must be 'numpy' or 'torch', not {format!r}")
        if shuffle:
            from diffdissect.store.stream import MixingStream

            stream = MixingStream(
                self,
                layer,
                t,
                batch_size,
                seed=seed,
                select=select,
                mix_shards=mix_shards,
                with_rows=True,
                drop_last=False,
            )
            shape = tuple(self.manifest.layers[layer]["shape"])
            try:
                for batch, ids in stream:
                    yield self._emit(batch.view(-1, *shape), ids, format, with_rows, dtype)
            finally:
                stream.close()
            return
        yield from self._in_order(layer, t, batch_size, select, format, with_rows, dtype)

    def _in_order(
        self,
        layer: str,
        t: int,
        batch_size: int,
        select: np.ndarray | None,
        format: ArrayFormat,
        with_rows: bool,
        dtype: str | None,
    ) -> Iterator[Any]:
        """Row ranges in order into batches: each batch is one new tensor filled range by range (a file read
        straight into it when no conversion is asked for), never re-joined."""
        from diffdissect.store.stream import _runs

        key, shape = slice_key(layer, t), tuple(self.manifest.layers[layer]["shape"])
        out_dtype = getattr(torch, dtype) if dtype else self.stored_dtype(layer)
        ranges: list[tuple[ShardRecord, int, int, int]] = []  # (shard, start, stop, global offset)
        filled = 0
        for shard, offset in self._shard_offsets():
            if shard.rows == 0:
                continue
            mask = None if select is None else np.asarray(select[offset : offset + shard.rows], dtype=bool)
            if mask is not None and not mask.any():
                continue
            runs = ((0, shard.rows),) if mask is None else _runs(np.flatnonzero(mask))
            for a, b in runs:
                while a < b:
                    take = min(batch_size - filled, b - a)
                    ranges.append((shard, a, a + take, offset))
                    filled += take
                    a += take
                    if filled == batch_size:
                        yield self._emit(
                            self._fill(key, ranges, shape, out_dtype), _ids(ranges), format, with_rows, None
                        )
                        ranges, filled = [], 0
        if filled:
            yield self._emit(self._fill(key, ranges, shape, out_dtype), _ids(ranges), format, with_rows, None)

    def load(self, layer: str, t: int, *, format: ArrayFormat = "numpy", dtype: str | None = None) -> Any:
        """The whole (layer, t) slice in row order. For slices that fit in memory (pooled features)."""
        self.manifest.check_slice(layer, t)
        key, shape = slice_key(layer, t), tuple(self.manifest.layers[layer]["shape"])
        out_dtype = getattr(torch, dtype) if dtype else self.stored_dtype(layer)
        block = self._fill(key, [(s, 0, s.rows, o) for s, o in self._shard_offsets() if s.rows], shape, out_dtype)
        return self._emit(block, None, format, False, None)

    def view(self, shard: ShardRecord, key: str) -> torch.Tensor:
        """A zero-copy view (rows, *shape) of one slice of a shard, in its stored dtype: the file's pages,
        mapped copy-on-write (never written back). Copy what you keep; row ranges of it read only those bytes."""
        path = self._checked(shard)  # name, symlinks, size and sha256 (once per file version)
        try:
            entry = self._header(path)[key]
            with open(path, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            dtype, shape, begin, end = entry
            if end == begin:
                view = torch.empty(shape, dtype=dtype, device="cpu")
            else:
                view = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin).view(
                    shape
                )
        except (OSError, ValueError, KeyError, struct.error, json.JSONDecodeError, RuntimeError) as exc:
            raise StoreError(
                f"shard {shard.name} could not be read ({type(exc).__name__}: {exc}); run `diffdissect store verify`."
            ) from exc
        checked = (str(path), shard.sha256, key)
        if checked not in self._finite:  # row count and finiteness, once per slice of a shard per reader
            check_block(view, shard, key)
            self._finite.add(checked)
        return view

    def _header(self, path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        """Each tensor's (dtype, shape, first byte, end byte) in a shard, parsed once per reader (the header also
        holds the shard's row index, which is slow to parse)."""
        stat = path.stat()
        cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
        cached = self._headers.get(cache_key)
        if cached is None:
            with open(path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            cached = {
                key: (
                    SAFETENSORS_DTYPES[e["dtype"]],
                    tuple(int(x) for x in e["shape"]),
                    *(8 + length + int(x) for x in e["data_offsets"]),
                )
                for key, e in header.items()
                if key != "__metadata__"
            }
            self._headers[cache_key] = cached
        return cached

    def read_into(self, shard: ShardRecord, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Read rows [start, stop) of one slice of a shard straight from the file into `out` (a contiguous CPU
        tensor of those rows, in the stored dtype): one positioned read, no mapping, no extra copy."""
        path = self._checked(shard)  # name, symlinks, size and sha256 (once per file version)
        try:
            dtype, shape, begin, end = self._header(path)[key]
            if shape[0] != shard.rows:
                raise StoreError(
                    f"shard {shard.name}: slice {key} has {shape[0]} rows, the manifest says "
                    f"{shard.rows}; the store is corrupt (run `diffdissect store verify`)."
                )
            row_bytes = (end - begin) // max(shape[0], 1)
            if not out.is_contiguous():
                raise ValueError("out must be contiguous")
            buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy().data)
            if out.dtype != dtype or len(buffer) != (stop - start) * row_bytes:
                raise ValueError(f"out holds {out.dtype} x {len(buffer)} bytes, not {dtype} rows {start}:{stop}")
            position = begin + start * row_bytes
            with open(path, "rb", buffering=0) as fh:
                while len(buffer):
                    got = os.preadv(fh.fileno(), [buffer], position)
                    if got <= 0:
                        raise OSError(f"{path.name} ended {len(buffer)} bytes early")
                    buffer, position = buffer[got:], position + got
        except (OSError, KeyError, struct.error, json.JSONDecodeError) as exc:
            raise StoreError(
                f"shard {shard.name} could not be read ({type(exc).__name__}: {exc}); run `diffdissect store verify`."
            ) from exc
        check_finite(out, shard, key)

    def _fill(
        self, key: str, ranges: list[tuple[ShardRecord, int, int, int]], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """One new tensor holding the ranges' rows in order: read straight into it, or converted from the
        mapped file in one copy when `dtype` is not the stored one."""
        out = torch.empty((sum(b - a for _, a, b, _ in ranges), *shape), dtype=dtype, device="cpu")
        at = 0
        for shard, a, b, _ in ranges:
            if not self._path(shard).is_file():
                self.view(shard, key)  # raises the error that names the missing shard
            if dtype == self._header(self._path(shard))[key][0]:
                self.read_into(shard, key, a, b, out[at : at + b - a])
            else:
                out[at : at + b - a].copy_(self.view(shard, key)[a:b])
            at += b - a
        return out

    def stored_dtype(self, layer: str) -> torch.dtype:
        """The dtype the slices of `layer` are stored in."""
        name = self.manifest.layers[layer].get("dtype") or self.manifest.dtype
        return getattr(torch, name)

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

    @staticmethod
    def _emit(
        batch: torch.Tensor, ids: np.ndarray | None, format: ArrayFormat, with_rows: bool, dtype: str | None
    ) -> Any:
        if dtype is not None:
            batch = batch.to(getattr(torch, dtype))
        if format == "numpy":
            out: Any = (batch.float() if batch.dtype == torch.bfloat16 else batch).numpy()
        elif format == "torch":
            out = batch
        else:
            raise ValueError(f"format must be 'numpy' or 'torch', not {format!r}")
        return (out, ids) if with_rows else out


SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _ids(ranges: list[tuple[ShardRecord, int, int, int]]) -> np.ndarray:
    return np.concatenate([np.arange(offset + a, offset + b) for _, a, b, offset in ranges])
