"""What every store reader checks before it trusts a byte: one place, called by the readers and by verify.

* names: a shard is a plain file name inside `shards/` (no separators, no `..`, not absolute), and its file is
  no symlink that leaves the store;
* counts: the manifest's row counts agree with each shard (its own row list and every tensor's first axis);
* checksum: a shard's sha256 matches the manifest's, checked once per file version (size, mtime) per process;
* finiteness: every block handed to an analysis is finite; a bad one names its shard and slice.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import torch

from diffdissect.atomic import sha256_file
from diffdissect.errors import StoreError

# shards and manifests are typed loosely here: store.manifest calls this module, so it cannot import that one
ShardRecord = Any
Manifest = Any
SHARDS_DIR = "shards"
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_verified: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> sha256 seen to match
_lock = threading.Lock()


def check_manifest_fields(manifest: Manifest, stated_rows: Any = None) -> None:
    """Cheap checks on a manifest as read: shard names, counts, duplicate names, the stated total."""
    names = set()
    for shard in manifest.shards:
        check_shard_name(shard.name)
        if shard.name in names:
            raise StoreError(f"manifest.json lists the shard {shard.name} twice; the store is corrupt.")
        names.add(shard.name)
        if not isinstance(shard.rows, int) or shard.rows < 0 or not isinstance(shard.bytes, int) or shard.bytes < 0:
            raise StoreError(
                f"manifest.json gives shard {shard.name} {shard.rows!r} rows and {shard.bytes!r} bytes; "
                "the store is corrupt."
            )
    if stated_rows is not None and stated_rows != manifest.rows:
        raise StoreError(
            f"manifest.json states {stated_rows} rows but its shards hold {manifest.rows}; the store is "
            "corrupt (run `diffdissect store verify`)."
        )


def check_shard_name(name: Any) -> None:
    if not isinstance(name, str) or not _PLAIN.match(name) or ".." in name:
        raise StoreError(
            f"manifest.json names a shard {name!r}, which is not a plain file name inside {SHARDS_DIR}/; "
            "refusing to read outside the store (the manifest is corrupt or hostile)."
        )


def shard_path(directory: str | Path, name: str) -> Path:
    """The shard's path inside the store, refusing names and symlinks that would lead outside it."""
    check_shard_name(name)
    directory = Path(directory)
    path = directory / SHARDS_DIR / name
    if path.is_symlink() or (directory / SHARDS_DIR).is_symlink():
        root = directory.resolve()
        real = path.resolve()
        if root not in real.parents:
            raise StoreError(
                f"shard {name} is a symlink to {real}, outside the store {root}; refusing to read it. "
                "Copy the file into the store instead."
            )
    return path


def check_checksum(path: Path, shard: ShardRecord) -> None:
    """The shard's size and sha256 against the manifest; a file version seen to match is not hashed again."""
    if not path.is_file():
        raise StoreError(
            f"shard {shard.name} is listed in the manifest but missing from {path.parent}; run the same "
            "capture again to rewrite it (`diffdissect store verify` lists every bad shard)."
        )
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        if _verified.get(key) == shard.sha256:
            return
    if st.st_size != shard.bytes:
        raise StoreError(
            f"shard {shard.name} has {st.st_size} bytes, the manifest says {shard.bytes}: it is truncated "
            "or altered. Run the same capture again to rewrite it."
        )
    if sha256_file(path) != shard.sha256:
        raise StoreError(
            f"shard {shard.name} fails its checksum: its content was corrupted after it was written. Run "
            "the same capture again to rewrite it."
        )
    with _lock:
        _verified[key] = shard.sha256


def remember_verified(path: Path, sha256: str) -> None:
    """A shard this process has just written with this digest needs no rehash when it is read back."""
    st = path.stat()
    with _lock:
        _verified[(str(path.resolve()), st.st_size, st.st_mtime_ns)] = sha256


def shard_problem(path: Path, shard: ShardRecord) -> str | None:
    """Why a committed shard cannot be trusted (missing, truncated, corrupt, unreadable), or None."""
    from safetensors import safe_open

    try:
        check_checksum(path, shard)
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
        import json

        check_rows(json.loads(meta.get("rows", "[]")), shard)
    except StoreError as exc:
        return str(exc)
    except Exception as exc:  # a damaged header
        return f"shard {shard.name} is unreadable ({exc})"
    return None


def check_block(block: torch.Tensor, shard: ShardRecord, key: str) -> None:
    """A whole slice read from a shard: as many rows as the manifest says, and finite."""
    if block.shape[0] != shard.rows:
        raise StoreError(
            f"shard {shard.name}: slice {key} has {block.shape[0]} rows, the manifest says {shard.rows}; "
            "the store is corrupt (run `diffdissect store verify`)."
        )
    check_finite(block, shard, key)


def check_finite(block: torch.Tensor, shard: ShardRecord, key: str) -> None:
    """Rows read from a shard hold no NaN, inf or float16-saturated values."""
    if not block.is_floating_point():
        return
    finite = torch.isfinite(block)
    if block.dtype == torch.float16:  # capture refuses values beyond float16; its maximum means saturation
        finite &= block.abs() < torch.finfo(torch.float16).max
    if not bool(finite.all()):
        bad = int((~finite).reshape(block.shape[0], -1).any(1).sum())
        raise StoreError(
            f"shard {shard.name}: slice {key} holds NaN, inf or saturated values in {bad} of {shard.rows} "
            "rows; an analysis would report numbers computed from them. Capture again into a new --out "
            "(with --dtype bfloat16 or float32 if the model overflows float16)."
        )


def check_rows(rows: list[Any], shard: ShardRecord) -> None:
    if len(rows) != shard.rows:
        raise StoreError(
            f"shard {shard.name} lists {len(rows)} rows, the manifest says {shard.rows}; the store is "
            "corrupt (run `diffdissect store verify`)."
        )
