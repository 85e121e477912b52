"""Where images come from. Every source has a length, random access and a stable identity.

A corrupt or unreadable image raises :class:`UnreadableInput` from `load`; capture skips it with
a warning and records it in the store's manifest (`diffdissect store info` shows the count).
"""

from __future__ import annotations

import csv
import hashlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from diffdissect.atomic import sha256_file
from diffdissect.data.transforms import to_rgb
from diffdissect.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# row-index columns that an input's own attributes may not overwrite
RESERVED_COLUMNS = frozenset(
    {"row", "input_id", "source_index", "seed", "label", "caption", "shard", "image", "image_sha256"}
)


class UnreadableInput(Exception):
    """One input could not be decoded; capture skips and counts it."""


@dataclass
class ImageRecord:
    input_id: str  # stable id (relative path, dataset row, array index)
    source_index: int  # position in the source
    image: Any  # PIL image or HxWx3 array
    label: Any = None
    caption: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)  # more columns for the row index (factors, ...)
    content_sha256: str | None = None  # sha256 of the file's bytes, for sources read from files


class ImageSource(Protocol):
    def __len__(self) -> int: ...
    def load(self, index: int) -> ImageRecord: ...
    def identity(self) -> dict[str, Any]: ...


def _digest(items: Sequence[Any]) -> str:
    return hashlib.sha256("\x00".join(map(str, items)).encode()).hexdigest()[:16]


class FolderSource:
    """Images under a folder (recursive, sorted), optionally with a CSV of labels/captions.

    The CSV names files relative to the folder in `id_column`; with a CSV, its rows (in order) are
    the inputs and every named file must exist.
    """

    def __init__(
        self,
        root: str | Path,
        csv_path: str | Path | None = None,
        *,
        id_column: str = "file",
        label_column: str | None = "label",
        caption_column: str | None = "caption",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a directory.")
        self.meta: list[dict[str, str]] = []
        if csv_path is not None:
            self.meta = self._read_csv(Path(csv_path), id_column)
            self.files = [row[id_column] for row in self.meta]
            self._check_rows(Path(csv_path), id_column)
            missing = [f for f in self.files if not (self.root / f).is_file()]
            if missing:
                raise DataError(
                    f"{len(missing)} files named in {csv_path} are not in {self.root}, "
                    f"e.g. {missing[:3]}; fix the CSV's {id_column!r} column."
                )
        else:
            self.files = sorted(
                p.relative_to(self.root).as_posix()
                for p in self.root.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
        if not self.files:
            raise DataError(f"no images found in {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively).")
        self.csv_path, self.label_column, self.caption_column = csv_path, label_column, caption_column
        self.id_column = id_column
        self._position = {name: i for i, name in enumerate(self.files)}
        self._content: list[str] | None = None
        if self.meta:
            named = {id_column, label_column, caption_column}
            ignored = sorted((set(self.meta[0]) & RESERVED_COLUMNS) - named)
            if ignored:
                warnings.warn(
                    f"labels CSV {csv_path}: columns {ignored} are reserved row-index columns and were "
                    "ignored; rename them to keep them.",
                    stacklevel=2,
                )

    def _check_rows(self, csv_path: Path, id_column: str) -> None:
        """Every row names one file inside the folder, once."""
        seen: dict[str, int] = {}
        root = self.root.resolve()
        for line, name in enumerate(self.files, start=2):
            if not name:
                raise DataError(f"labels CSV {csv_path}, line {line}: the {id_column!r} column is empty.")
            if name in seen:
                raise DataError(
                    f"labels CSV {csv_path} names {name!r} twice (lines {seen[name]} and {line}); each "
                    "image may appear once. Remove the duplicate row."
                )
            seen[name] = line
            path = Path(name)
            if path.is_absolute() or ".." in path.parts or root not in (root / path).resolve().parents:
                raise DataError(
                    f"labels CSV {csv_path}, line {line}: {name!r} is not a file inside {self.root}; name "
                    "files relative to the image folder, without '..'."
                )

    @staticmethod
    def _read_csv(path: Path, id_column: str) -> list[dict[str, str]]:
        if not path.is_file():
            raise DataError(f"labels CSV {path} does not exist.")
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is not a column
                rows = list(csv.DictReader(fh))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"labels CSV {path} could not be read as UTF-8 CSV ({exc}); save it as UTF-8.") from None
        if not rows:
            raise DataError(f"labels CSV {path} has no rows.")
        if id_column not in rows[0]:
            raise DataError(
                f"labels CSV {path} has no {id_column!r} column (columns: {list(rows[0])}); pass --id-column."
            )
        return rows

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> ImageRecord:
        name = self.files[index]
        try:
            data = (self.root / name).read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                image = to_rgb(img)
        except Exception as exc:  # PIL raises many types for truncated/corrupt files
            raise UnreadableInput(f"{name}: {exc}") from exc
        row = self.meta[index] if self.meta else {}
        named = {self.id_column, self.label_column, self.caption_column}
        return ImageRecord(
            name,
            index,
            image,
            row.get(self.label_column or ""),
            row.get(self.caption_column or ""),
            {k: v for k, v in row.items() if k not in named and k not in RESERVED_COLUMNS},
            content_sha256=hashlib.sha256(data).hexdigest(),
        )

    def index_of(self, name: str) -> int | None:
        """The position of the file `name` (relative to the folder), or None."""
        return self._position.get(name)

    def content_hashes(self) -> list[str]:
        """sha256 of every file's bytes, in order (read once per source object)."""
        if self._content is None:
            self._content = [sha256_file(self.root / f) if (self.root / f).is_file() else "missing" for f in self.files]
        return self._content

    def identity(self) -> dict[str, Any]:
        """What the inputs are (names, bytes, labels), plus where they are (`path`, `csv`: never compared)."""
        return {
            "type": "folder",
            "path": str(self.root.resolve()),
            "count": len(self),
            "csv": str(Path(self.csv_path).resolve()) if self.csv_path else None,
            "listing": _digest(self.files),
            "content": _digest(self.content_hashes()),
            "labels": _digest([sorted(r.items()) for r in self.meta]) if self.meta else None,
        }


class HFDatasetSource:
    """A Hugging Face `datasets` dataset: a Dataset object, a `save_to_disk` folder, or a name (offline cache)."""

    def __init__(
        self,
        dataset: Any,
        *,
        split: str | None = None,
        image_column: str = "image",
        label_column: str | None = None,
        caption_column: str | None = None,
        id_column: str | None = None,
    ):
        import datasets

        self.name = str(dataset) if isinstance(dataset, (str, Path)) else (dataset.info.dataset_name or "in-memory")
        if isinstance(dataset, (str, Path)):
            path = Path(dataset)
            try:
                dataset = (
                    datasets.load_from_disk(str(path))
                    if path.is_dir()
                    else datasets.load_dataset(str(dataset), split=split)
                )
            except Exception as exc:
                raise DataError(f"could not load the dataset {str(path)!r}: {exc}") from exc
        if isinstance(dataset, datasets.DatasetDict):
            if split is None or split not in dataset:
                raise DataError(f"the dataset has splits {list(dataset)}; choose one with --split.")
            dataset = dataset[split]
        for col in (image_column, label_column, caption_column, id_column):
            if col is not None and col not in dataset.column_names:
                raise DataError(f"the dataset has no column {col!r}; columns: {dataset.column_names}.")
        self.dataset, self.split = dataset, split
        self.image_column, self.label_column = image_column, label_column
        self.caption_column, self.id_column = caption_column, id_column
        feature = dataset.features.get(label_column) if label_column else None
        self.label_names = getattr(feature, "names", None)
        if len(dataset) == 0:
            raise DataError("the dataset is empty.")

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> ImageRecord:
        try:
            row = self.dataset[index]
            image = row[self.image_column]
            image = to_rgb(image) if isinstance(image, Image.Image) else np.asarray(image)
        except Exception as exc:
            raise UnreadableInput(f"row {index}: {exc}") from exc
        label = row.get(self.label_column) if self.label_column else None
        if self.label_names is not None and label is not None:
            label = self.label_names[label]
        input_id = str(row[self.id_column]) if self.id_column else f"row{index:08d}"
        return ImageRecord(input_id, index, image, label, row.get(self.caption_column) if self.caption_column else None)

    def identity(self) -> dict[str, Any]:
        return {
            "type": "hf_dataset",
            "name": str(self.name),
            "split": self.split,
            "count": len(self),
            "fingerprint": getattr(self.dataset, "_fingerprint", None),
        }


class ArraySource:
    """In-memory images: an (N, H, W, 3) uint8 array (or floats in [0, 1]) or a list of PIL images."""

    def __init__(
        self,
        images: Any,
        labels: Sequence[Any] | None = None,
        captions: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
        attributes: dict[str, Sequence[Any]] | None = None,
    ):
        self.images = images
        n = len(images)
        if n == 0:
            raise DataError("ArraySource got no images.")
        self.attributes = dict(attributes or {})
        for name, seq in (
            ("labels", labels),
            ("captions", captions),
            ("ids", ids),
            *((f"attributes[{k!r}]", v) for k, v in self.attributes.items()),
        ):
            if seq is not None and len(seq) != n:
                raise DataError(f"ArraySource: {len(seq)} {name} for {n} images.")
        clash = RESERVED_COLUMNS & set(self.attributes)
        if clash:
            raise DataError(
                f"ArraySource: attribute names {sorted(clash)} are reserved row-index columns; rename them."
            )
        self.labels, self.captions = labels, captions
        self.ids = [str(i) for i in ids] if ids is not None else [f"img{i:08d}" for i in range(n)]
        if len(set(self.ids)) != n:
            raise DataError("ArraySource: ids are not unique.")

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> ImageRecord:
        label = self.labels[index] if self.labels is not None else None
        if isinstance(label, np.generic):
            label = label.item()
        caption = self.captions[index] if self.captions is not None else None
        attributes = {k: v[index] for k, v in self.attributes.items()}
        return ImageRecord(self.ids[index], index, self.images[index], label, caption, attributes)

    def identity(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for i in range(len(self)):
            img = self.images[i]
            h.update(np.asarray(img).tobytes())
        return {
            "type": "arrays",
            "count": len(self),
            "content": h.hexdigest()[:16],
            "meta": _digest(
                [
                    self.ids,
                    self.labels,
                    self.captions,
                    sorted((k, list(map(str, v))) for k, v in self.attributes.items()),
                ]
            ),
        }
