"""Interventions: edits applied by hooks while the pipeline samples, and `steer`, which measures their effect."""

from diffdissect.intervene.apply import Intervention, layer_shapes, sampling_schedule
from diffdissect.intervene.edits import (
    AddEdit,
    Context,
    Direction,
    EraseEdit,
    MeanEdit,
    SAEEdit,
    Window,
)
from diffdissect.intervene.sources import (
    EditSpec,
    bind_edit,
    load_direction,
    parse_edit,
    parse_edits,
)
from diffdissect.intervene.steer import Judge, SteerConfig, SteerResult, run_steer

__all__ = [
    "AddEdit",
    "Context",
    "Direction",
    "EditSpec",
    "EraseEdit",
    "Intervention",
    "Judge",
    "MeanEdit",
    "SAEEdit",
    "SteerConfig",
    "SteerResult",
    "Window",
    "bind_edit",
    "layer_shapes",
    "load_direction",
    "parse_edit",
    "parse_edits",
    "run_steer",
    "sampling_schedule",
]
