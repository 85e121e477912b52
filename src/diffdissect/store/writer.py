"""Writing a store: shards are committed atomically, then recorded in the manifest.

Crash safety: a shard is written to a temporary file and renamed into place; only then is the
manifest (also written atomically) updated to list it. A shard file that the manifest does not list
was never committed and is rewritten on resume. Because capture is deterministic, a resumed store
holds exactly the bytes an uninterrupted run writes.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from diffdissect.atomic import TMP_SUFFIX, atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from diffdissect.distributed import SINGLE, Dist
from diffdissect.errors import StoreError
from diffdissect.lock import LOCK_NAME
from diffdissect.runtime import version
from diffdissect.store.integrity import remember_verified, shard_problem
from diffdissect.store.manifest import FORMAT_VERSION, INDEX, MANIFEST, SHARDS_DIR, Manifest, ShardRecord

INDEX_COLUMNS = ("row", "input_id", "source_index", "seed", "label", "caption", "shard")
RANKS_DIR = "ranks"  # distributed runs: each rank lists the shards it committed in its own file


def _spec_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the spec fields that differ, e.g. ``capture.timesteps``, ``model.weights_fingerprint``."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            name
            for key in sorted(set(old) | set(new), key=str)
            for name in _spec_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors serialises `__metadata__` from a Rust HashMap, whose order changes from call to call; without
    this, two identical captures write different bytes (and sha256s). Data offsets are relative to the end
    of the header, so only the header changes; it stays padded with spaces to 8-byte alignment.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def check_store_directory(directory: Path | str) -> None:
    """Refuse an --out that is a file, or a non-empty directory that is no store (before anything is written)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise StoreError(f"{directory} is a file, not a directory; choose a new --out directory.")
    if (directory / MANIFEST).exists():
        return
    if directory.exists() and any(p.name != LOCK_NAME for p in directory.iterdir()):
        raise StoreError(
            f"{directory} exists, is not empty and is not an activation store; refusing to write "
            "into it. Choose a new --out directory."
        )


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}.safetensors"


class StoreWriter:
    """Owns one store directory while a capture runs. Create it with :meth:`open`."""

    def __init__(self, directory: Path, manifest: Manifest, dist: Dist = SINGLE):
        self.directory = Path(directory)
        self.manifest = manifest
        self.dist = dist
        self._rank_records: list[ShardRecord] = []

    @classmethod
    def open(cls, directory: Path | str, manifest: Manifest, dist: Dist = SINGLE) -> StoreWriter:
        """Start a new store, or resume one written with the same spec. Refuses to mix specs.

        Distributed: rank 0 creates or resumes the store (merging the shard lists that ranks of an
        interrupted run left behind); the other ranks wait for it, then open the same store."""
        directory = Path(directory)
        manifest.diffdissect_version = version()
        if not dist.enabled:
            return cls._open_main(directory, manifest, dist)
        status = torch.zeros(1)
        writer, error = None, None
        if dist.is_main:
            try:
                writer = cls._open_main(directory, manifest, dist)
                status += 1
            except Exception as exc:  # noqa: BLE001 - tell the other ranks, then raise here
                error = exc
        dist.broadcast_(status)
        if error is not None:
            raise error
        if not status.item():
            raise StoreError(f"rank 0 could not open the store {directory}; its error says why.")
        return writer if writer is not None else cls(directory, Manifest.load(directory), dist)

    @classmethod
    def _open_main(cls, directory: Path, manifest: Manifest, dist: Dist) -> StoreWriter:
        writer = cls._open_store(directory, manifest)
        writer.dist = dist
        writer._merge_rank_records()
        return writer

    @classmethod
    def _open_store(cls, directory: Path, manifest: Manifest) -> StoreWriter:
        if (directory / MANIFEST).exists():
            existing = Manifest.load(directory)
            if existing.format_version < FORMAT_VERSION and (existing.shards or existing.complete):
                raise StoreError(
                    f"{directory} was written by an older diffdissect (store format {existing.format_version}; this "
                    f"one writes {FORMAT_VERSION}), whose model and input identities were weaker: a resume could not "
                    "prove it continues the same capture. The store can still be read; capture into a new --out."
                )
            holds_data = (
                existing.shards
                or existing.complete
                or any(not p.name.endswith(TMP_SUFFIX) for p in (directory / SHARDS_DIR).glob("*"))
            )
            if not holds_data:
                # a capture that failed before its first shard (e.g. float16 overflow): nothing to lose,
                # so the corrected command may start over here
                remove_stale_temporaries(directory)
                writer = cls(directory, manifest)
                writer._write_manifest()
                return writer
            if existing.spec_hash != manifest.spec_hash or existing.mode != manifest.mode:
                diff = _spec_diff(existing.spec, manifest.spec)
                raise StoreError(
                    f"{directory} holds a capture made with a different spec (differs in: "
                    f"{', '.join(diff) or 'mode'}). Refusing to mix data: choose a new --out "
                    "directory, or delete this one to start over."
                )
            remove_stale_temporaries(directory)
            existing.locations = manifest.locations or existing.locations
            writer = cls(directory, existing)
            writer._drop_bad_shards()
            return writer
        check_store_directory(directory)
        (directory / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        writer = cls(directory, manifest)
        writer._write_manifest()
        return writer

    def _drop_bad_shards(self) -> None:
        """A resume repairs the store: committed shards that are missing, truncated, corrupt or unreadable are
        dropped from the manifest (and their files removed), so the capture writes exactly those again."""
        bad = []
        for shard in self.manifest.shards:
            path = self.directory / SHARDS_DIR / shard.name
            problem = shard_problem(path, shard)
            if problem:
                bad.append(shard.name)
                warnings.warn(f"{problem}; it will be captured again", stacklevel=3)
                path.unlink(missing_ok=True)
        if bad:
            self.manifest.shards = [s for s in self.manifest.shards if s.name not in bad]
            self.manifest.complete = False
            repaired = set(self.manifest.notes.get("repaired_shards", [])) | set(bad)
            self.manifest.notes["repaired_shards"] = sorted(repaired)
            self._write_manifest()

    @property
    def committed(self) -> set[str]:
        return {s.name for s in self.manifest.shards}

    def is_committed(self, chunk: int) -> bool:
        return shard_name(chunk) in self.committed

    def write_shard(
        self,
        chunk: int,
        tensors: Mapping[str, torch.Tensor],
        rows: list[dict[str, Any]],
        inputs: tuple[int, int],
        skipped: list[dict[str, Any]],
    ) -> ShardRecord:
        """Commit one shard: all (layer, t) tensors for the rows of input chunk `chunk`."""
        name = shard_name(chunk)
        metadata = {
            "rows": json.dumps(rows),
            "inputs": json.dumps(list(inputs)),
            "skipped": json.dumps(skipped),
            "format": "diffdissect-shard",
        }
        data = canonical_safetensors(
            safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
        )
        path = self.directory / SHARDS_DIR / name
        try:
            digest = atomic_write_bytes(path, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(
                    f"ran out of disk space while writing {name} ({len(data)} bytes). The partial shard "
                    f"was removed and the {len(self.manifest.shards)} committed shards are intact; "
                    "free space and run the same command again to resume."
                ) from exc
            raise
        remember_verified(path, digest)
        record = ShardRecord(
            name=name, rows=len(rows), bytes=len(data), sha256=digest, inputs=list(inputs), skipped=skipped
        )
        self.manifest.shards = [s for s in self.manifest.shards if s.name != name] + [record]
        self.manifest.shards.sort(key=lambda s: s.name)
        if self.dist.enabled:  # only rank 0 writes the manifest, when every rank has finished
            self._rank_records = [s for s in self._rank_records if s.name != name] + [record]
            (self.directory / RANKS_DIR).mkdir(exist_ok=True)
            atomic_write_json(self._rank_file(self.dist.rank), [asdict(r) for r in self._rank_records])
        else:
            self._write_manifest()
        return record

    def _rank_file(self, rank: int) -> Path:
        return self.directory / RANKS_DIR / f"rank-{rank:05d}.json"

    def _merge_rank_records(self) -> None:
        """Fold the shard lists written by ranks into the manifest (committed shards only), then drop them."""
        files = (
            sorted((self.directory / RANKS_DIR).glob("rank-*.json")) if (self.directory / RANKS_DIR).is_dir() else []
        )
        if not files:
            return
        records = {s.name: s for s in self.manifest.shards}
        for path in files:
            for entry in json.loads(path.read_text()):
                record = ShardRecord(**entry)
                shard = self.directory / SHARDS_DIR / record.name
                if shard.is_file() and shard.stat().st_size == record.bytes:
                    records[record.name] = record
        self.manifest.shards = sorted(records.values(), key=lambda s: s.name)
        self._write_manifest()  # first the manifest, then the lists it now contains
        for path in files:
            path.unlink()

    def finalize(self, input_count: int) -> Manifest:
        """Write the row index and mark the store complete (distributed: rank 0, once every rank is done)."""
        if self.dist.enabled:
            self.dist.barrier()
            if self.dist.is_main:
                self._merge_rank_records()
                if self.manifest.rows:  # an empty store is refused by the caller, never completed
                    self._finalize(input_count)
            self.dist.barrier()
            self.manifest = Manifest.load(self.directory)
            return self.manifest
        return self._finalize(input_count)

    def _finalize(self, input_count: int) -> Manifest:
        from diffdissect.store.reader import StoreReader  # reader parses shard metadata

        self.manifest.input_count = input_count
        rows = StoreReader(self.directory, self.manifest).rows()
        buffer = io.StringIO()
        extra = sorted({k for row in rows for k in row} - set(INDEX_COLUMNS))  # per-input attributes
        columns = [*INDEX_COLUMNS, *extra]
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        try:
            atomic_write_bytes(self.directory / INDEX, buffer.getvalue().encode())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(
                    f"ran out of disk space while writing {self.directory / INDEX}; every shard is "
                    "committed: free space and run the same command again to finish."
                ) from exc
            raise
        self.manifest.complete = True
        self._write_manifest()
        return self.manifest

    def _write_manifest(self) -> None:
        try:
            atomic_write_json(self.directory / MANIFEST, self.manifest.to_json())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(
                    f"ran out of disk space while writing {self.directory / MANIFEST}. The previous manifest and the "
                    "shards it lists are intact; free space and run the same command again to resume."
                ) from exc
            raise
