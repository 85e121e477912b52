"""Image sources (folder + CSV, Hugging Face datasets, arrays) and resizing to a model's resolution."""

from diffdissect.data.sources import (
    ArraySource,
    FolderSource,
    HFDatasetSource,
    ImageRecord,
    ImageSource,
    UnreadableInput,
)
from diffdissect.data.transforms import to_model_pixels

__all__ = [
    "ArraySource",
    "FolderSource",
    "HFDatasetSource",
    "ImageRecord",
    "ImageSource",
    "UnreadableInput",
    "to_model_pixels",
]
