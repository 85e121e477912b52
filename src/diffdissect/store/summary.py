"""What a store holds, as plain data (`diffdissect store info`)."""

from __future__ import annotations

from typing import Any

from diffdissect.store.reader import StoreReader


def store_summary(reader: StoreReader) -> dict[str, Any]:
    """Mode, completeness, rows, shards, bytes, dtype, skipped inputs, model identity, timesteps and layers."""
    m = reader.manifest
    return {
        "mode": m.mode,
        "complete": m.complete,
        "rows": m.rows,
        "shards": len(m.shards),
        "bytes": sum(s.bytes for s in m.shards),
        "dtype": m.dtype,
        "skipped": len(m.skipped),
        "model": m.model,
        "timesteps": m.timesteps,
        "layers": m.layers,
    }
