"""Capture: hooks with early exit, layer listing, pooling, trajectories along sampling."""

from diffdissect.capture.engine import capture, capture_images
from diffdissect.capture.hooks import LayerRecorder, StopForward, output_tensor
from diffdissect.capture.layers import LayerInfo, list_layers, resolve_layers
from diffdissect.capture.spec import CaptureConfig, OutputOptions, TrajectoryConfig
from diffdissect.capture.trajectory import capture_trajectories

__all__ = [
    "CaptureConfig",
    "OutputOptions",
    "TrajectoryConfig",
    "capture",
    "capture_images",
    "capture_trajectories",
    "LayerRecorder",
    "StopForward",
    "output_tensor",
    "LayerInfo",
    "list_layers",
    "resolve_layers",
]


def __getattr__(name: str) -> object:  # the names before "one word for configs" (deprecated)
    from diffdissect.runtime import deprecated_alias

    return deprecated_alias(__name__, name, {"CaptureSpec": CaptureConfig, "TrajectorySpec": TrajectoryConfig})
