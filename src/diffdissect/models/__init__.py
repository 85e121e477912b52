"""Loading diffusion targets (pipelines, bare denoisers, plain modules) and their noise schedules."""

from diffdissect.models.load import load_target
from diffdissect.models.target import Target

__all__ = ["Target", "load_target"]
