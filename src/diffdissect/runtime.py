"""Ground floor: what every room uses at run time and that imports nothing of diffdissect above `errors`.

- `version()`: the installed package's version, read from its metadata (one source: pyproject.toml).
- `quiet_libraries()`: silence diffusers/transformers progress bars and advisory warnings.
- `seeded(seed)`: a forked, seeded CPU RNG scope.
- `load_factory(spec)`: the one `package.module:factory` loader (models, classifiers).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from diffdissect.errors import DiffdissectError

__all__ = ["version", "quiet_libraries", "seeded", "load_factory", "import_factory"]


def version() -> str:
    """The installed diffdissect version, from the package metadata (pyproject.toml is the one source)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("diffdissect")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def quiet_libraries() -> None:
    """diffusers/transformers progress bars and advisory warnings drown our own output."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run under a forked CPU RNG seeded with `seed`: the caller's CPU and CUDA RNG states are untouched
    (only the CPU generator is seeded, so CUDA is never initialised)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def import_factory(spec: str, *, what: str, error: type[DiffdissectError] = DiffdissectError) -> Any:
    """The object named by 'package.module:attr' (not called). `what` names the option in error messages."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise error(f"{what} {spec!r}: expected package.module:factory.")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise error(f"cannot import {spec!r} ({what}): {exc}") from exc


def load_factory(spec: str, *, what: str, error: type[DiffdissectError] = DiffdissectError) -> Any:
    """Import 'package.module:factory' and call it with no arguments (a non-callable object is returned as is)."""
    obj = import_factory(spec, what=what, error=error)
    if not callable(obj) or isinstance(obj, torch.nn.Module):
        return obj
    try:
        return obj()
    except Exception as exc:
        raise error(
            f"{spec} failed when called with no arguments: {exc!r}; the factory must build the model without arguments."
        ) from exc


def deprecated_alias(module: str, name: str, renamed: dict[str, Any]) -> Any:
    """A module's `__getattr__` for renamed public names: the new object, with a DeprecationWarning."""
    if name in renamed:
        new = renamed[name]
        warnings.warn(f"{module}.{name} is deprecated; use {new.__name__}", DeprecationWarning, stacklevel=3)
        return new
    raise AttributeError(f"module {module!r} has no attribute {name!r}")
