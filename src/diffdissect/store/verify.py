"""Integrity check of a store: every committed shard present, complete, unaltered and well-formed."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from diffdissect.atomic import TMP_SUFFIX, sha256_file
from diffdissect.errors import StoreError
from diffdissect.store.integrity import shard_path
from diffdissect.store.manifest import INDEX, SHARDS_DIR, Manifest, parse_slice_key, slice_key

_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


@dataclass
class VerifyReport:
    directory: str
    shards_checked: int = 0
    problems: list[str] = field(default_factory=list)  # each names the shard and what is wrong
    bad_shards: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    complete: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(directory: Path | str) -> VerifyReport:
    """Check sizes, sha256 checksums, headers, tensor keys and shapes of every shard."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    report = VerifyReport(directory=str(directory), complete=manifest.complete)
    expected_keys = {slice_key(layer, t) for layer in manifest.layers for t in manifest.timestep_values}
    listed = set()
    for shard in manifest.shards:
        listed.add(shard.name)
        report.shards_checked += 1
        try:
            path = shard_path(directory, shard.name)  # plain names only; no symlink out of the store
        except StoreError as exc:
            report.problems.append(str(exc))
            report.bad_shards.append(shard.name)
            continue
        problem = _check_shard(path, shard, manifest, expected_keys)
        if problem:
            report.problems.append(f"{shard.name}: {problem}")
            report.bad_shards.append(shard.name)
    for path in sorted((directory / SHARDS_DIR).glob("*")):
        if path.name.endswith(TMP_SUFFIX):
            report.warnings.append(f"{path.name}: leftover of an interrupted write (removed on resume)")
        elif path.name not in listed:
            report.warnings.append(
                f"{path.name}: not listed in the manifest (uncommitted: readers ignore it; a resume rewrites it if its chunk is still missing)"
            )
    for path in sorted(directory.glob(f".*{TMP_SUFFIX}")):  # manifest.json / index.csv temporaries
        report.warnings.append(f"{path.name}: leftover of an interrupted write (removed on resume)")
    root = directory.resolve()
    for path in sorted(directory.rglob("*")):
        if path.is_symlink() and root not in path.resolve().parents:
            report.problems.append(f"{path.relative_to(directory)}: a symlink to {path.resolve()}, outside the store")
    if manifest.complete and not report.problems:
        problem = _check_index(directory, manifest)
        if problem:
            report.problems.append(f"{INDEX}: {problem}")
    if not manifest.complete:
        report.warnings.append("capture is not complete: run the same capture command again to resume")
    return report


def _check_index(directory: Path, manifest: Manifest) -> str | None:
    """index.csv lists exactly the rows the shards hold, in order."""
    from diffdissect.store.reader import StoreReader

    path = directory / INDEX
    if not path.is_file():
        return "missing (the capture is marked complete); run the same capture again to rewrite it"
    try:
        with open(path, newline="") as fh:
            index = list(csv.DictReader(fh))
        rows = StoreReader(directory, manifest).rows()
    except (StoreError, csv.Error, UnicodeDecodeError) as exc:
        return f"cannot be compared with the shards ({exc})"
    if len(index) != len(rows):
        return f"lists {len(index)} rows, the shards hold {len(rows)}"
    for entry, row in zip(index, rows):
        for key in ("row", "input_id", "seed", "shard"):
            if str(entry.get(key, "")) != str(row.get(key, "")):
                return f"row {row['row']}: {key} is {entry.get(key)!r} in the index, {row.get(key)!r} in the shards"
    return None


def _check_shard(path: Path, shard, manifest: Manifest, expected_keys: set[str]) -> str | None:
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != shard.bytes:
        return f"truncated or altered: {size} bytes on disk, {shard.bytes} expected"
    if sha256_file(path) != shard.sha256:
        return "checksum mismatch: the file content is corrupted"
    try:
        with safe_open(path, framework="pt") as fh:
            keys = set(fh.keys())
            rows = json.loads((fh.metadata() or {}).get("rows", "[]"))
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: str(fh.get_slice(k).get_dtype()) for k in keys}
    except Exception as exc:
        return f"unreadable safetensors file ({exc})"
    if keys != expected_keys:
        return f"tensor keys differ from the manifest (missing: {sorted(expected_keys - keys)[:3]})"
    if len(rows) != shard.rows:
        return f"row index lists {len(rows)} rows, manifest says {shard.rows}"
    for key, shape in shapes.items():
        layer, _ = parse_slice_key(key)
        want = (shard.rows, *manifest.layers[layer]["shape"])
        if shape != want:
            return f"tensor {key} has shape {shape}, expected {want}"
        stored = _SAFETENSORS_DTYPES.get(dtypes[key], dtypes[key])
        expected = manifest.layers[layer].get("dtype", manifest.dtype)
        if stored != expected:
            return f"tensor {key} is stored as {stored}, the manifest says {expected}"
    return None


def raise_if_bad(report: VerifyReport) -> None:
    if not report.ok:
        raise StoreError("store verification failed:\n  " + "\n  ".join(report.problems))
