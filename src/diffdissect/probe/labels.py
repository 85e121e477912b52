"""Label columns of a store turned into class indices, with the checks a probe needs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffdissect.errors import DataError

STORE_COLUMNS = ("row", "input_id", "source_index", "seed", "shard")  # bookkeeping, never labels


@dataclass
class EncodedLabels:
    name: str
    classes: list[str]
    y: np.ndarray  # (rows,) int64 class index; -1 where missing (rows dropped)
    missing: int  # rows without a value

    @property
    def present(self) -> np.ndarray:
        return self.y >= 0


def is_missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def label_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Columns of the row index that could be labels (everything but bookkeeping and captions)."""
    names: dict[str, None] = {}
    for r in rows[:1000]:
        names.update(dict.fromkeys(k for k in r if k not in STORE_COLUMNS and k != "caption"))
    return list(names)


def encode_labels(rows: Sequence[dict[str, Any]], column: str, *, drop_missing: bool = False) -> EncodedLabels:
    """Class indices of `column` for every row (classes sorted by their text)."""
    if rows and column not in label_columns(rows):
        raise DataError(
            f"the store has no label column {column!r}; its columns are {label_columns(rows)}. "
            "Label columns come from the capture's --labels CSV, dataset columns or attributes."
        )
    values = [r.get(column) for r in rows]
    missing = np.array([is_missing(v) for v in values], dtype=bool)
    if missing.any() and not drop_missing:
        examples = [rows[i].get("input_id") for i in np.nonzero(missing)[0][:5]]
        raise DataError(
            f"label column {column!r} is missing a value in {int(missing.sum())} of {len(rows)} rows "
            f"(e.g. inputs {examples}); fill them in, or pass --drop-missing to probe without those rows"
        )
    text = np.array(["" if m else str(v) for v, m in zip(values, missing)], dtype=object)
    classes = sorted(set(text[~missing].tolist()))
    if len(classes) < 2:
        raise DataError(
            f"label column {column!r} has {len(classes)} class{'es' if len(classes) != 1 else ''} "
            f"({classes}); a probe needs at least 2. Pick another column or capture more varied inputs"
        )
    index = {c: k for k, c in enumerate(classes)}
    y = np.array([-1 if m else index[t] for t, m in zip(text, missing)], dtype=np.int64)
    return EncodedLabels(column, classes, y, int(missing.sum()))
