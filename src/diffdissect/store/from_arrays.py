"""A store from features computed elsewhere (another tool, a synthetic benchmark): the same format as a capture."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffdissect.errors import DataError
from diffdissect.lock import DirectoryLock
from diffdissect.store.manifest import Manifest, slice_key, spec_digest
from diffdissect.store.writer import StoreWriter


def write_array_store(
    out: str | Path,
    features: Mapping[tuple[str, int], np.ndarray | torch.Tensor],
    rows: Sequence[Mapping[str, Any]],
    *,
    shard_rows: int = 4096,
    dtype: str = "float32",
    model: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write `features[(layer, t)]` (rows first, same row count everywhere) with one row-index entry per row.

    Each row needs an ``input_id``; ``seed`` defaults to 0. Other keys (labels, attributes) become
    columns, exactly as a capture's attributes do. Every layer must be present at every t.
    """
    if not features:
        raise DataError("no features to write: pass {(layer, t): array}")
    layers = list(dict.fromkeys(layer for layer, _ in features))
    timesteps = sorted({int(t) for _, t in features})
    missing = [(l, t) for l in layers for t in timesteps if (l, t) not in features]
    if missing:
        raise DataError(f"every layer needs every timestep; missing {missing[:5]}")
    blocks = {k: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v) for k, v in features.items()}
    n = len(rows)
    bad = {k: tuple(v.shape) for k, v in blocks.items() if len(v) != n}
    if bad:
        raise DataError(f"{n} rows given but these slices have other row counts: {bad}")
    if any("input_id" not in r for r in rows):
        raise DataError("every row needs an 'input_id'")
    torch_dtype = getattr(torch, dtype)
    spec = {
        "capture": {"from_arrays": True, "layers": layers, "timesteps": timesteps},
        "rows": n,
        "shard_rows": shard_rows,
    }
    manifest = Manifest(
        mode="arrays",
        spec=spec,
        spec_hash=spec_digest(spec),
        model=dict(model or {"source": "arrays"}),
        timesteps=[{"t": t} for t in timesteps],
        layers={l: {"shape": list(blocks[(l, timesteps[0])].shape[1:]), "dtype": dtype} for l in layers},
        dtype=dtype,
    )
    with DirectoryLock(out, "write_array_store"):
        return _write(StoreWriter.open(out, manifest), blocks, rows, n, shard_rows, torch_dtype)


def _write(
    writer: StoreWriter,
    blocks: dict,
    rows: Sequence[Mapping[str, Any]],
    n: int,
    shard_rows: int,
    torch_dtype: torch.dtype,
) -> Manifest:
    for chunk, start in enumerate(range(0, n, shard_rows)):
        stop = min(n, start + shard_rows)
        tensors = {slice_key(l, t): blocks[(l, t)][start:stop].to(torch_dtype).contiguous() for l, t in blocks}
        part = [{"seed": 0, "source_index": i, "label": None, "caption": None, **rows[i]} for i in range(start, stop)]
        writer.write_shard(chunk, tensors, part, (start, stop), [])
    return writer.finalize(n)
