"""Capture: hooks with early exit, layer listing, pooling, trajectories along sampling."""
from diffdissect.capture.engine import capture, capture_images
from diffdissect.capture.hooks import LayerRecorder, StopForward, output_tensor
from diffdissect.capture.layers import LayerInfo, list_layers, resolve_layers
from diffdissect.capture.spec import CaptureSpec, OutputOptions, TrajectorySpec
from diffdissect.capture.trajectory import capture_trajectories

__all__ = ["CaptureSpec", "OutputOptions", "TrajectorySpec", "capture", "capture_images", "capture_trajectories",
           "LayerRecorder", "StopForward", "output_tensor", "LayerInfo", "list_layers", "resolve_layers"]
