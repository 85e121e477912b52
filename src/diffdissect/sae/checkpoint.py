"""SAE checkpoints: safetensors for tensors, JSON for everything else; written atomically, never pickled."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from diffdissect.atomic import atomic_write_bytes, atomic_write_json
from diffdissect.errors import StoreError
from diffdissect.sae.model import SAEConfig, TopKSAE

WEIGHTS, STATE, CONFIG = "sae.safetensors", "training_state.safetensors", "config.json"


def save_checkpoint(directory: Path, sae: TopKSAE, info: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> None:
    """Weights (+ training state) first, then config.json: a directory whose config names step s holds step s."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / WEIGHTS, save({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}))
    if state is not None:
        atomic_write_bytes(directory / STATE, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
    atomic_write_json(directory / CONFIG, {"format": "diffdissect-sae", "format_version": 1,
                                           "sae": sae.config.to_json(), **info})


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise StoreError(f"{directory} holds no SAE checkpoint ({CONFIG} missing); train one with `diffdissect sae train`")
    return json.loads(path.read_text())


def load_sae(directory: str | Path, *, d_in: int | None = None,
             device: str | torch.device = "cpu") -> tuple[TopKSAE, dict[str, Any]]:
    """The SAE saved in `directory` and its config, on `device` (whatever device it was trained on).
    `d_in` checks the inputs it will be given."""
    directory = Path(directory)
    info = read_config(directory)
    config = SAEConfig(**info["sae"])
    if d_in is not None:
        check_d_in(directory, info, d_in)
    sae = TopKSAE(config, device=device)
    sae.load_state_dict({k: v.to(device) for k, v in load_file(directory / WEIGHTS).items()})   # read on the CPU
    return sae.eval(), info


def check_d_in(directory: Path, info: dict[str, Any], d_in: int) -> None:
    """Refuse features of another width than the SAE in `directory` (described by its config `info`) takes."""
    expected = info["sae"]["d_in"]
    if d_in != expected:
        raise StoreError(f"the SAE in {directory} takes d_in={expected} inputs but these features have "
                         f"d_in={d_in}; use the SAE trained on this layer (see its config.json: "
                         f"{info.get('slice', {})})")


def load_state(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(directory) / STATE
    return {k: v.to(device) for k, v in load_file(path).items()} if path.is_file() else {}
