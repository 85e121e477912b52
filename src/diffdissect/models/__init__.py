"""Loading diffusion targets (pipelines, bare denoisers, plain modules) and their noise schedules."""
from diffdissect.models.target import Target
from diffdissect.models.load import load_target

__all__ = ["Target", "load_target"]
