"""The store manifest: what was captured, how, and which shards are committed.

Layout of a store directory::

    manifest.json            this file's content (rewritten atomically after every committed shard)
    index.csv                the row index, written when the capture completes
    shards/shard-000000.safetensors   one tensor per (layer, t) slice, rows = (input, seed) pairs;
                                      the shard's rows are in its safetensors metadata
    images/                  trajectory mode only: the generated images (PNG)

Every (layer, t) slice of a store has the same rows in the same order; t lives in the slice key,
not in the row. A row is one (input, seed) pair.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffdissect.errors import StoreError
from diffdissect.models.identity import current_kind

FORMAT = "diffdissect-store"
FORMAT_VERSION = 2  # 2: full-content model identity, image-content input identity, path-free spec
MANIFEST = "manifest.json"
INDEX = "index.csv"
SHARDS_DIR = "shards"
IMAGES_DIR = "images"
KEY_SEP = "@t="


def slice_key(layer: str, t: int) -> str:
    """Tensor key of the (layer, t) slice inside a shard, e.g. ``mid_block@t=25``."""
    return f"{layer}{KEY_SEP}{int(t)}"


def parse_slice_key(key: str) -> tuple[str, int]:
    layer, _, t = key.rpartition(KEY_SEP)
    return layer, int(t)


def spec_digest(spec: dict[str, Any]) -> str:
    """A stable hash of the parts of a capture spec that change the stored data."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ShardRecord:
    name: str
    rows: int
    bytes: int
    sha256: str
    inputs: list[int]  # [start, stop) positions of the inputs this shard covers
    skipped: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Manifest:
    """Everything a reader needs to interpret a store, as plain JSON."""

    mode: str  # "images" or "trajectory"
    spec: dict[str, Any]  # the capture spec (what changes the data)
    spec_hash: str
    model: dict[str, Any]  # source, class, kind, config digest, weights fingerprint
    timesteps: list[dict[str, Any]]  # t, alpha_bar, signal_scale, noise_std (per stored t)
    layers: dict[str, dict[str, Any]]  # path -> {"shape": [...per row], "dtype": str}
    dtype: str
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False
    input_count: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # facts learnt while capturing (not part of the spec)
    locations: dict[str, Any] = field(default_factory=dict)  # where model and inputs were read from (never compared)
    diffdissect_version: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return [s for shard in self.shards for s in shard.skipped]

    @property
    def timestep_values(self) -> list[int]:
        return [int(e["t"]) for e in self.timesteps]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = self.rows
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StoreError("manifest.json is not a diffdissect store manifest (no 'format' field).")
        if int(data.get("format_version", -1)) > FORMAT_VERSION:
            raise StoreError(
                f"this store has format version {data['format_version']}, newer than this diffdissect "
                f"understands ({FORMAT_VERSION}); upgrade diffdissect to read it."
            )
        from diffdissect.store.integrity import check_manifest_fields

        stated_rows = data.get("rows")
        data = {k: v for k, v in data.items() if k != "rows"}
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StoreError(
                f"manifest.json has fields this diffdissect does not know ({unknown}); the store is "
                "corrupt or from another tool."
            )
        try:
            data["shards"] = [ShardRecord(**s) for s in data.get("shards", [])]
            if isinstance(data.get("model"), dict):
                data["model"] = current_kind(data["model"])
            manifest = cls(**data)
        except TypeError as exc:
            raise StoreError(f"manifest.json is malformed ({exc}); the store is corrupt.") from None
        check_manifest_fields(manifest, stated_rows)
        return manifest

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise StoreError(
                f"{directory} is not an activation store: {MANIFEST} is missing. "
                "Create one with `diffdissect capture ... --out DIR`."
            )
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise StoreError(f"{path} is unreadable ({exc}); the store is corrupt.") from exc

    def content_identity(self) -> dict[str, Any]:
        """What this store holds, independent of where it lives: an analysis run records it to refuse another store."""
        shards = hashlib.sha256("".join(f"{s.name}:{s.sha256};" for s in self.shards).encode()).hexdigest()[:16]
        return {"spec_hash": self.spec_hash, "rows": self.rows, "shards_sha256": shards}

    def timestep_entry(self, t: int) -> dict[str, Any]:
        for entry in self.timesteps:
            if int(entry["t"]) == int(t):
                return entry
        raise StoreError(f"timestep t={t} is not in this store; stored timesteps: {self.timestep_values}.")

    def check_slice(self, layer: str, t: int) -> None:
        if layer not in self.layers:
            raise StoreError(f"layer {layer!r} is not in this store; stored layers: {sorted(self.layers)}.")
        self.timestep_entry(t)
