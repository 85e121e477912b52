"""One pass from shard bytes to batches: zero-copy shard views, seeded mixing pools across shards, prefetch.

- **Reads.** A shard's (layer, t) slice is a zero-copy view of the file (`StoreReader.view`, an mmap).
  Row ranges of it are read by the one copy that builds a pool, so each byte is touched once on the way
  in; there is no full-shard copy, no per-row Python and no re-joining of remainders.
- **Mixing (i.i.d. batches with bounded memory).** Every epoch, each shard's selected rows are cut into
  contiguous row ranges ("pieces"), and the pieces are dealt round-robin over pools, visiting the
  shards in a seeded random order and each shard's pieces in a seeded random order. A pool holds about
  `mix_shards` shards' rows, taken from row ranges of (nearly) every shard, so even a store written in
  sorted class order gives pools, and so batches, with the store's mix. A batch is a seeded draw
  without replacement from its pool (a batch that straddles two pools takes the first pool's last
  items and the next pool's first ones). Memory: about three pools (the one consumed, one ready, one
  being built).
- **Layout and dtype.** Building a pool changes the layout to items (rows, or every spatial location
  as a token) and converts to the training dtype in the same copy.
- **Prefetch.** A background thread builds the next pool while the current one is consumed; it is
  joined on `close()` (and when the stream is garbage-collected).
- **Devices.** For an accelerator the thread copies the selected rows in their stored dtype into
  pinned memory and moves them with a non-blocking copy on a side stream; the layout change, the
  conversion and the batch gathers then run on the device. Every tensor is created on its device.

Everything random comes from `seed` (and the epoch): the batches are the same bytes on every run and
every device, whatever the thread timing.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from diffdissect.devices import pins
from diffdissect.store.manifest import Manifest, ShardRecord, slice_key


class SliceSource(Protocol):
    """What the stream needs of a store (`StoreReader` is one): its manifest, zero-copy slice views, dtypes."""

    manifest: Manifest

    def view(self, shard: ShardRecord, key: str) -> torch.Tensor: ...

    def stored_dtype(self, layer: str) -> torch.dtype: ...

    def read_into(self, shard: ShardRecord, key: str, start: int, stop: int, out: torch.Tensor) -> None: ...


MIN_PIECE_BYTES = 256 * 1024  # row ranges are at least this big (when a shard allows), so reads stay large
MIN_PIECES = 8  # ... but a shard is always cut into up to this many pieces, however small
POOL_RING = 3  # pool buffers reused in turn: consumed, ready, being built


@dataclass(frozen=True)
class Piece:
    """A contiguous share of one shard's selected rows: `runs` are [start, stop) row ranges inside the shard."""

    shard: int
    runs: tuple[tuple[int, int], ...]

    @property
    def rows(self) -> int:
        return sum(b - a for a, b in self.runs)


def _runs(rows: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Sorted row numbers -> maximal [start, stop) ranges of consecutive rows."""
    if not len(rows):
        return ()
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return tuple((int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops))


def plan_pools(
    selected: list[np.ndarray], row_bytes: int, pool_rows: int, rng: np.random.Generator
) -> list[list[Piece]]:
    """Deal every shard's selected rows (local row numbers per shard) over pools of about `pool_rows` rows.

    Each shard is cut into up to one piece per pool (fewer when pieces would fall under MIN_PIECE_BYTES,
    but at least MIN_PIECES), and the pieces are dealt round-robin, so every pool takes rows from
    (nearly) every shard. Within a pool, pieces are in shard order (sequential reads).
    """
    total = sum(len(s) for s in selected)
    n_pools = max(1, round(total / max(1, pool_rows)))
    pools: list[list[Piece]] = [[] for _ in range(n_pools)]
    turn = 0
    for shard in rng.permutation(len(selected)):
        rows = selected[shard]
        if not len(rows):
            continue
        by_size = max(MIN_PIECES, len(rows) * row_bytes // MIN_PIECE_BYTES)
        n_pieces = int(min(n_pools, len(rows), by_size))
        parts = np.array_split(rows, n_pieces)
        for k in rng.permutation(n_pieces):
            pools[turn % n_pools].append(Piece(int(shard), _runs(parts[k])))
            turn += 1
    return [sorted(p, key=lambda piece: (piece.shard, piece.runs[0])) for p in pools if p]


class _Prefetch:
    """Runs a generator in a daemon thread, `depth` items ahead; errors are raised in the consumer."""

    _DONE = object()

    def __init__(self, make: Callable[[], Iterator[Any]], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True, name="diffdissect-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Iterator[Any]]) -> None:
        try:
            for item in make():
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(_Failure(exc))

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)


@dataclass
class _Failure:
    error: BaseException


class _Pool:
    """A built pool: `items` (n, d) on the device in the output dtype, the global row id of each item, and
    the seeded draw order."""

    def __init__(self, items: torch.Tensor, ids: torch.Tensor | None, order: torch.Tensor):
        self.items, self.ids, self.order = items, ids, order


class MixingStream:
    """Batches of items (rows, or tokens = spatial locations) of one (layer, t) slice, mixed across shards.

    `select` (bool per store row) picks the rows; `tokens` makes every spatial location of a row an
    item, `pool_locations` mean-pools spatial rows instead. Epochs run from `start_epoch` for `epochs`
    passes (None: forever); a final partial batch of an epoch is dropped when `drop_last`. `skip` batches
    are passed over without being gathered (a resumed run). Iterate it once; `close()` it when done.
    """

    def __init__(
        self,
        reader: SliceSource,
        layer: str,
        t: int,
        batch_size: int,
        *,
        seed: int = 0,
        select: np.ndarray | None = None,
        tokens: bool = False,
        pool_locations: bool = False,
        mix_shards: int = 4,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        epochs: int | None = 1,
        start_epoch: int = 0,
        drop_last: bool = True,
        with_rows: bool = False,
        skip: int = 0,
        prefetch: int = 1,
    ):
        reader.manifest.check_slice(layer, t)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        self.reader, self.key = reader, slice_key(layer, t)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.shape = tuple(reader.manifest.layers[layer]["shape"])
        self.tokens = tokens and len(self.shape) > 1
        self.pool_locations = pool_locations and len(self.shape) > 1 and not self.tokens
        self.locations = int(np.prod(self.shape[1:])) if self.tokens else 1
        # an item: a location's channels (tokens), a row's mean over locations, or a whole row (flattened)
        self.width = self.shape[0] if (self.tokens or self.pool_locations) else int(np.prod(self.shape))
        self.device = torch.device(device)
        self.stored = stored = reader.stored_dtype(layer)
        self.dtype = dtype or stored
        shards = reader.manifest.shards
        offsets = np.cumsum([0] + [s.rows for s in shards])
        mask = np.ones(int(offsets[-1]), dtype=bool) if select is None else np.asarray(select, dtype=bool)
        self.offsets = offsets
        self.selected = [np.flatnonzero(mask[offsets[i] : offsets[i + 1]]) for i in range(len(shards))]
        self.row_bytes = int(np.prod(self.shape)) * torch.empty((), dtype=stored, device="meta").element_size()
        self.pool_rows = max(1, mix_shards * int(np.mean([s.rows for s in shards])) if shards else 1)
        self.epochs, self.start_epoch, self.drop_last = epochs, start_epoch, drop_last
        self.with_rows, self.skip = with_rows, int(skip)
        self._ring: list[torch.Tensor | None] = [None] * POOL_RING
        self._pinned: torch.Tensor | None = None
        self._prefetch = _Prefetch(self._pools, prefetch) if prefetch > 0 else None
        self._batches = self._iterate()

    # ---- the consumer -------------------------------------------------------------------------------
    def __iter__(self) -> MixingStream:
        return self

    def __next__(self) -> Any:
        return next(self._batches)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None
        self._batches.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a half-built stream, or interpreter shutdown
            self.close()

    def _iterate(self) -> Generator[Any, None, None]:
        size, to_skip = self.batch_size, self.skip
        carry: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # materialised items of a straddling batch
        carried = 0
        epoch = None
        pools = iter(self._prefetch) if self._prefetch is not None else self._pools()
        for pool_epoch, pool in pools:
            if pool_epoch != epoch:  # a new epoch: the last one's partial batch
                if carried and not self.drop_last:
                    yield self._emit(carry)
                carry, carried, epoch = [], 0, pool_epoch
            n, pos = len(pool.order), 0
            while pos < n:
                take = min(size - carried, n - pos)
                part = pool.order[pos : pos + take]
                pos += take
                carried += take
                if to_skip == 0:
                    carry.append(
                        (
                            pool.items.index_select(0, part),
                            pool.ids.index_select(0, part) if pool.ids is not None else None,
                        )
                    )
                if carried == size:
                    if to_skip:
                        to_skip -= 1
                    else:
                        yield self._emit(carry)
                    carry, carried = [], 0
        if carried and not self.drop_last and not to_skip:
            yield self._emit(carry)

    def _emit(self, parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Any:
        items = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
        if not self.with_rows:
            return items
        ids = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts if p[1] is not None])
        assert ids is not None  # with_rows: every part carries its row ids
        return items, ids.cpu().numpy()

    # ---- the producer (runs in the prefetch thread) -------------------------------------------------------
    def _pools(self) -> Iterator[tuple[int, _Pool]]:
        epoch, built = self.start_epoch, 0
        while self.epochs is None or epoch < self.start_epoch + self.epochs:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFF, epoch])
            for pieces in plan_pools(self.selected, self.row_bytes, self.pool_rows, rng):
                items, ids = self._build(pieces, built % POOL_RING)
                generator = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**62)))
                order = torch.randperm(len(items), generator=generator, device="cpu").to(self.device)
                built += 1
                yield epoch, _Pool(items, ids, order)
            epoch += 1
            if not any(len(s) for s in self.selected):
                return

    def _build(self, pieces: list[Piece], slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = sum(p.rows for p in pieces)
        n_items, d = rows * self.locations, self.width
        ids = None
        if self.with_rows:
            ids = torch.from_numpy(
                np.concatenate([np.arange(a, b) + self.offsets[p.shard] for p in pieces for a, b in p.runs])
            )
            if self.tokens:
                ids = ids.repeat_interleave(self.locations)
            ids = ids.to(self.device)
        shards = self.reader.manifest.shards
        plain = not self.tokens and not self.pool_locations and self.dtype == self.stored
        if self.device.type == "cpu":
            out = self._buffer(slot, n_items, d)
            at = 0
            if plain:  # rows as stored: a file read straight into the pool
                for piece in pieces:
                    for a, b in piece.runs:
                        self.reader.read_into(shards[piece.shard], self.key, a, b, out[at : at + b - a])
                        at += b - a
                return out, ids
            views = {s: self.reader.view(shards[s], self.key) for s in {p.shard for p in pieces}}
            for piece in pieces:  # one copy: mapped file -> items in the output dtype
                for a, b in piece.runs:
                    at += self._copy_items(views[piece.shard][a:b], out, at)
            return out, ids
        staging = self._staging(rows)  # stored dtype, stored layout, pinned for a non-blocking copy
        at = 0
        for piece in pieces:
            for a, b in piece.runs:
                self.reader.read_into(shards[piece.shard], self.key, a, b, staging[at : at + b - a])
                at += b - a
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(side) if side is not None else _nothing():
            moved = staging[:rows].to(self.device, non_blocking=side is not None)
            out = torch.empty(n_items, d, dtype=self.dtype, device=self.device)
            self._copy_items(moved, out, 0)
        if side is not None:
            side.synchronize()  # the pool is complete before the consumer sees it
        return out, ids

    def _copy_items(self, block: torch.Tensor, out: torch.Tensor, at: int) -> int:
        """Copy rows `block` (n, d, *spatial) into `out[at:]` as items, converting the dtype; returns the count."""
        n = len(block)
        if self.tokens:
            out[at : at + n * self.locations].view(n, self.locations, -1).copy_(block.flatten(2).transpose(1, 2))
            return n * self.locations
        if self.pool_locations:
            out[at : at + n].copy_(block.flatten(2).mean(-1, dtype=torch.float32))
        else:
            out[at : at + n].copy_(block.reshape(n, -1))
        return n

    def _buffer(self, slot: int, n: int, d: int) -> torch.Tensor:
        buffer = self._ring[slot]
        if buffer is None or buffer.numel() < n * d:
            buffer = self._ring[slot] = torch.empty(n * d, dtype=self.dtype, device="cpu")
        return buffer[: n * d].view(n, d)

    def _staging(self, rows: int) -> torch.Tensor:
        if self._pinned is None or len(self._pinned) < rows:
            self._pinned = torch.empty(
                (rows, *self.shape), dtype=self.stored, device="cpu", pin_memory=pins(self.device)
            )
        return self._pinned


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
