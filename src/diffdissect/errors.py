"""Errors a user can act on. Each message says what was wrong and how to fix it."""

from __future__ import annotations


class DiffdissectError(Exception):
    """Base class: bad input or state the user can fix. The CLI prints these without a traceback."""


class ModelLoadError(DiffdissectError):
    """The model path, hub id or format could not be loaded."""


class LayerNotFoundError(DiffdissectError):
    """A requested module path does not exist in the model."""


class SpecError(DiffdissectError):
    """A capture specification is invalid (timesteps out of range, empty layers, ...)."""


class DataError(DiffdissectError):
    """Input data is missing, empty or unreadable."""


class StoreError(DiffdissectError):
    """The activation store is missing, incompatible or corrupt."""


class NonFiniteActivationError(DiffdissectError):
    """Captured activations contain NaN or inf."""
