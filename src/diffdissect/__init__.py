"""diffdissect: open up diffusion models and say, with evidence, what their representations encode."""
from __future__ import annotations

__version__ = "0.1.0"

from diffdissect.errors import DiffdissectError
from diffdissect.models import Target, load_target, list_layers
from diffdissect.capture import CaptureSpec, TrajectorySpec, capture, capture_trajectories
from diffdissect.store import StoreReader, open_store, verify_store
from diffdissect.data import ArraySource, FolderSource, HFDatasetSource

__all__ = [
    "__version__", "DiffdissectError", "Target", "load_target", "list_layers",
    "CaptureSpec", "TrajectorySpec", "capture", "capture_trajectories",
    "StoreReader", "open_store", "verify_store",
    "ArraySource", "FolderSource", "HFDatasetSource",
]
