"""SAE checkpoints: one safetensors file per checkpoint, written atomically, stamped with its step; never pickled.

`checkpoint.safetensors` holds the weights (``sae.*``), the training state (``state.*``: Adam's moments, the
dead-latent counters, ...) and, in its metadata, the run's full config and the step. Because it is one file
renamed into place, a checkpoint is either the old one or the new one, never weights of one step with state of
another; a failed write (SIGKILL, a full disk) leaves the previous checkpoint as it was. `config.json` beside it
is a readable copy, rewritten after the checkpoint; on load the checkpoint's own copy wins.

Directories written before format 2 (sae.safetensors + training_state.safetensors + config.json) are still read.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from diffdissect.atomic import atomic_write_bytes, atomic_write_json
from diffdissect.errors import DiffdissectError, StoreError
from diffdissect.sae.model import SAEConfig, TopKSAE
from diffdissect.store.writer import canonical_safetensors

CHECKPOINT, CONFIG = "checkpoint.safetensors", "config.json"
WEIGHTS, STATE = "sae.safetensors", "training_state.safetensors"  # format 1
FORMAT, FORMAT_VERSION = "diffdissect-sae", 2


class CheckpointWriteError(DiffdissectError):
    """A checkpoint could not be written (disk full, ...); the previous one is intact."""


def save_checkpoint(
    directory: Path, sae: TopKSAE, info: dict[str, Any], state: dict[str, torch.Tensor] | None = None
) -> None:
    """Write weights, training state and config as one atomic unit stamped with ``info["step"]``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "sae": sae.config.to_json(), **info}
    tensors = {f"sae.{k}": v.detach().to("cpu").contiguous() for k, v in sae.state_dict().items()}
    tensors.update({f"state.{k}": v.detach().to("cpu").contiguous() for k, v in (state or {}).items()})
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "step": str(info.get("step", 0)),
        "config": json.dumps(config, sort_keys=True),
    }
    try:
        atomic_write_bytes(directory / CHECKPOINT, canonical_safetensors(save(tensors, metadata=metadata)))
        atomic_write_json(directory / CONFIG, config)
    except OSError as exc:
        kept = _step_on_disk(directory)
        where = f"the previous checkpoint (step {kept}) is intact" if kept is not None else "no checkpoint was kept"
        why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else str(exc)
        raise CheckpointWriteError(
            f"could not write the SAE checkpoint at step {info.get('step')} in {directory} "
            f"({why}); {where}. Free space and run the same command again to resume."
        ) from exc


def has_checkpoint(directory: Path) -> bool:
    directory = Path(directory)
    return (directory / CHECKPOINT).is_file() or (directory / CONFIG).is_file()


def read_config(directory: Path) -> dict[str, Any]:
    """The run's config as its checkpoint records it (format 1: config.json)."""
    directory = Path(directory)
    if (directory / CHECKPOINT).is_file():
        return _read(directory)[0]
    path = directory / CONFIG
    if not path.is_file():
        raise StoreError(
            f"{directory} holds no SAE checkpoint ({CHECKPOINT} missing); train one with `diffdissect sae train`"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path} is not valid JSON ({exc}); the SAE directory is damaged.") from None


def load_sae(
    directory: str | Path, *, d_in: int | None = None, device: str | torch.device = "cpu"
) -> tuple[TopKSAE, dict[str, Any]]:
    """The SAE saved in `directory` and its config, on `device` (whatever device it was trained on).
    `d_in` checks the inputs it will be given."""
    directory = Path(directory)
    if (directory / CHECKPOINT).is_file():
        info, tensors = _read(directory, tensors=True)
        weights = {k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}
    else:
        info = read_config(directory)
        weights = load_file(directory / WEIGHTS)
    config = SAEConfig(**info["sae"])
    if d_in is not None:
        check_d_in(directory, info, d_in)
    sae = TopKSAE(config, device=device)
    sae.load_state_dict({k: v.to(device) for k, v in weights.items()})  # read on the CPU
    return sae.eval(), info


def load_state(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    directory = Path(directory)
    if (directory / CHECKPOINT).is_file():
        _, tensors = _read(directory, tensors=True)
        return {k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("state.")}
    path = directory / STATE
    return {k: v.to(device) for k, v in load_file(path).items()} if path.is_file() else {}


def is_legacy(directory: Path) -> bool:
    """A format-1 directory: weights, state and config in three files that a kill could leave at different steps."""
    directory = Path(directory)
    return not (directory / CHECKPOINT).is_file() and (directory / CONFIG).is_file()


def check_d_in(directory: Path, info: dict[str, Any], d_in: int) -> None:
    """Refuse features of another width than the SAE in `directory` (described by its config `info`) takes."""
    expected = info["sae"]["d_in"]
    if d_in != expected:
        raise StoreError(
            f"the SAE in {directory} takes d_in={expected} inputs but these features have "
            f"d_in={d_in}; use the SAE trained on this layer (see its config.json: "
            f"{info.get('slice', {})})"
        )


def _read(directory: Path, tensors: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = directory / CHECKPOINT
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            out = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}
        info = json.loads(meta["config"])
    except Exception as exc:
        raise StoreError(
            f"the SAE checkpoint {path} is unreadable ({exc}); delete the directory and train again."
        ) from None
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise StoreError(
            f"{path} is not an SAE checkpoint this diffdissect reads (format {meta.get('format')!r} "
            f"v{meta.get('format_version')})."
        )
    if str(info.get("step", 0)) != meta.get("step"):
        raise StoreError(
            f"{path} is stamped with step {meta.get('step')} but its config says {info.get('step')}; "
            "the checkpoint is damaged. Delete the directory and train again."
        )
    return info, out


def _step_on_disk(directory: Path) -> int | None:
    try:
        return int(read_config(directory).get("step", 0)) if has_checkpoint(directory) else None
    except DiffdissectError:
        return None
