"""Integrity check of a store: every committed shard present, complete, unaltered and well-formed."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from diffdissect.atomic import TMP_SUFFIX, sha256_file
from diffdissect.errors import StoreError
from diffdissect.store.manifest import SHARDS_DIR, Manifest, parse_slice_key, slice_key


@dataclass
class VerifyReport:
    directory: str
    shards_checked: int = 0
    problems: list[str] = field(default_factory=list)       # each names the shard and what is wrong
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
        problem = _check_shard(directory / SHARDS_DIR / shard.name, shard, manifest, expected_keys)
        if problem:
            report.problems.append(f"{shard.name}: {problem}")
            report.bad_shards.append(shard.name)
    for path in sorted((directory / SHARDS_DIR).glob("*")):
        if path.name.endswith(TMP_SUFFIX):
            report.warnings.append(f"{path.name}: leftover of an interrupted write (removed on resume)")
        elif path.name not in listed:
            report.warnings.append(f"{path.name}: not listed in the manifest (uncommitted: readers ignore it; a resume rewrites it if its chunk is still missing)")
    for path in sorted(directory.glob(f".*{TMP_SUFFIX}")):   # manifest.json / index.csv temporaries
        report.warnings.append(f"{path.name}: leftover of an interrupted write (removed on resume)")
    if not manifest.complete:
        report.warnings.append("capture is not complete: run the same capture command again to resume")
    return report


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
    return None


def raise_if_bad(report: VerifyReport) -> None:
    if not report.ok:
        raise StoreError("store verification failed:\n  " + "\n  ".join(report.problems))
