"""Capture: hooks with early exit, timesteps and noise, pooling, trajectories along sampling."""
from diffdissect.capture.spec import CaptureSpec, OutputOptions, TrajectorySpec
from diffdissect.capture.engine import capture
from diffdissect.capture.trajectory import capture_trajectories
from diffdissect.capture.hooks import LayerRecorder, StopForward, output_tensor

__all__ = ["CaptureSpec", "OutputOptions", "TrajectorySpec", "capture", "capture_trajectories", "LayerRecorder",
           "StopForward", "output_tensor"]
