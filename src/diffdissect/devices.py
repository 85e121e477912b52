"""Devices and compute dtypes named by the user (`--device`, `--dtype`): checked once, with errors that say what to do.

Every analysis takes a device name and creates its tensors on it (`device=` on every factory call,
or `*_like` of a tensor already there); `tests/test_devices.py` enforces that without a GPU.
"""

from __future__ import annotations

import torch

from diffdissect.errors import SpecError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A usable torch.device from a name ("cpu", "cuda", "cuda:1", "mps", "meta"); a clear error if it is absent."""
    if isinstance(name, torch.device):
        device = name
    else:
        try:
            device = torch.device(name or "cpu")
        except RuntimeError as exc:
            raise SpecError(f"--device {name!r} is not a device name ({exc}); use cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(
                f"--device {name} asks for CUDA, but this torch ({torch.__version__}) sees no CUDA device; "
                "run with --device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SpecError(
                f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SpecError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """A compute dtype from its name (float32, bfloat16, float16)."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise SpecError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def pins(device: torch.device) -> bool:
    """Whether host batches bound for `device` should be pinned (page-locked) for non-blocking copies."""
    return device.type == "cuda"
