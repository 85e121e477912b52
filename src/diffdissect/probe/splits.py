"""Deterministic train / validation / test splits by image id (every noise seed of an image together)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from diffdissect.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of images per split, and the salt of the hash that orders the images."""

    train: float = 0.6
    val: float = 0.2
    test: float = 0.2
    salt: str = "diffdissect-probe-v1"

    def validate(self) -> None:
        fractions = (self.train, self.val, self.test)
        if min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
            raise DataError(
                f"split fractions must be positive and sum to 1; got train={self.train}, "
                f"val={self.val}, test={self.test}"
            )


@dataclass
class Split:
    """Which split each row falls in (rows of one image always share it)."""

    spec: SplitConfig
    by_image: dict[str, str]
    row_split: np.ndarray = field(repr=False)  # (rows,) of "train" / "val" / "test"

    def mask(self, name: str) -> np.ndarray:
        return self.row_split == name

    def counts(self) -> dict[str, int]:
        """Images per split."""
        values = list(self.by_image.values())
        return {name: values.count(name) for name in SPLITS}


def split_images(input_ids: Sequence[str], spec: SplitConfig | None = None) -> Split:
    """Split rows by image id: images are ordered by a salted SHA-256 of their id and cut at the fractions.

    The assignment depends only on the set of ids and the salt: not on row order, batch, shard or
    noise seed, so two stores of the same images (a trained and a random-init model) split alike.
    """
    spec = spec or SplitConfig()
    spec.validate()
    ids = np.asarray([str(i) for i in input_ids])
    unique = sorted(set(ids.tolist()), key=lambda i: hashlib.sha256(f"{spec.salt}:{i}".encode()).hexdigest())
    n = len(unique)
    cut_train = int(round(spec.train * n))
    cut_val = cut_train + int(round(spec.val * n))
    by_image = {
        image: ("train" if k < cut_train else "val" if k < cut_val else "test") for k, image in enumerate(unique)
    }
    return Split(spec, by_image, np.array([by_image[i] for i in ids]))


def split_from_column(input_ids: Sequence[str], values: Sequence[object], column: str) -> Split:
    """A user's own split: a store column whose values are train / val / test."""
    ids = [str(i) for i in input_ids]
    by_image: dict[str, str] = {}
    for image, value in zip(ids, values):
        name = {"validation": "val", "valid": "val", "dev": "val"}.get(str(value).lower(), str(value).lower())
        if name not in SPLITS:
            raise DataError(
                f"split column {column!r} has the value {value!r} for image {image}; "
                f"use only train, val (validation) or test"
            )
        if by_image.setdefault(image, name) != name:
            raise DataError(
                f"split column {column!r} puts rows of image {image} in two splits; "
                "every noise seed of an image must be in the same split"
            )
    return Split(SplitConfig(salt=f"column:{column}"), by_image, np.array([by_image[i] for i in ids]))


def __getattr__(name: str) -> object:  # the names before "one word for configs" (deprecated)
    from diffdissect.runtime import deprecated_alias

    return deprecated_alias(__name__, name, {"SplitSpec": SplitConfig})
