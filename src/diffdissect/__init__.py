"""diffdissect: open up diffusion models and say, with evidence, what their representations encode."""

from __future__ import annotations

# The capture function is exported as `capture_images` (a top-level `capture` would hide the subpackage).
from diffdissect.capture import CaptureConfig, TrajectoryConfig, capture_images, capture_trajectories, list_layers
from diffdissect.data import ArraySource, FolderSource, HFDatasetSource
from diffdissect.errors import DiffdissectError
from diffdissect.models import Target, load_target
from diffdissect.runtime import version as _version
from diffdissect.store import StoreReader, open_store, verify_store

__version__ = _version()

__all__ = [
    "__version__",
    "DiffdissectError",
    "Target",
    "load_target",
    "list_layers",
    "CaptureConfig",
    "TrajectoryConfig",
    "capture_images",
    "capture_trajectories",
    "StoreReader",
    "open_store",
    "verify_store",
    "ArraySource",
    "FolderSource",
    "HFDatasetSource",
]


def __getattr__(name: str) -> object:  # the names before "one word for configs" (deprecated)
    from diffdissect.runtime import deprecated_alias

    return deprecated_alias(__name__, name, {"CaptureSpec": CaptureConfig, "TrajectorySpec": TrajectoryConfig})
