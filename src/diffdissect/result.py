"""Typed results: frozen dataclasses that write themselves as JSON (`to_json`) and read themselves back.

`to_json` writes the fields in declaration order; nested results, tuples and lists of results are written
recursively. A field declared with `omit_if_none()` is left out of the JSON when it is None (so optional
keys stay absent, as in the plain dicts the results replace). `from_json` of the base class fills the
fields by name and ignores unknown keys; results with nested results override it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

R = TypeVar("R", bound="Result")
OMIT_IF_NONE = "omit_if_none"


def omit_if_none() -> Any:
    """A field that defaults to None and is left out of `to_json` when None."""
    return dataclasses.field(default=None, metadata={OMIT_IF_NONE: True})


def to_json_value(value: Any) -> Any:
    """A value as plain JSON data: results via their `to_json`, tuples as lists, containers recursively."""
    if isinstance(value, Result):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json_value(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class Result:
    """Base of the typed results."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get(OMIT_IF_NONE):
                continue
            out[f.name] = to_json_value(value)
        return out

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
