"""Per-input attributes (e.g. the shapes world's factors) travel into the row index and index.csv."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import TINY_FACTORY
from diffdissect import ArraySource, CaptureConfig, FolderSource, load_target, open_store
from diffdissect.capture import capture
from diffdissect.errors import DataError


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)


def test_array_attributes_reach_rows_and_index_csv(tmp_path):
    shapes, sizes = ["circle", "square", "circle"], ["small", "large", "large"]
    source = ArraySource(_images(3), labels=[0, 1, 0], attributes={"shape": shapes, "size": sizes})
    capture(
        load_target(TINY_FACTORY), source, CaptureConfig(layers=["mid"], seeds=[0, 1]), tmp_path / "s", progress=False
    )
    store = open_store(tmp_path / "s")
    assert store.column("shape") == [s for s in shapes for _ in range(2)]
    assert store.column("size") == [s for s in sizes for _ in range(2)]
    with open(tmp_path / "s" / "index.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["shape"] for r in rows] == store.column("shape") and rows[0]["label"] == "0"


def test_extra_csv_columns_become_attributes(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(_images(2)):
        Image.fromarray(img).save(folder / f"{i}.png")
    (folder / "meta.csv").write_text("file,label,caption,colour,split\n0.png,a,x,red,train\n1.png,b,y,blue,test\n")
    capture(
        load_target(TINY_FACTORY),
        FolderSource(folder, folder / "meta.csv"),
        CaptureConfig(layers=["mid"]),
        tmp_path / "s",
        progress=False,
    )
    store = open_store(tmp_path / "s")
    assert store.column("colour") == ["red", "blue"] and store.column("split") == ["train", "test"]
    assert store.column("label") == ["a", "b"] and store.column("caption") == ["x", "y"]


def test_changing_attributes_changes_the_source_identity():
    a = ArraySource(_images(2), attributes={"shape": ["circle", "square"]})
    b = ArraySource(_images(2), attributes={"shape": ["square", "circle"]})
    assert a.identity() != b.identity()


@pytest.mark.parametrize(
    "attributes, message",
    [
        ({"shape": ["circle"]}, "1 attributes['shape'] for 2 images"),
        ({"seed": [1, 2]}, "reserved row-index columns"),
    ],
)
def test_bad_attributes_are_clear_errors(attributes, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ArraySource(_images(2), attributes=attributes)
