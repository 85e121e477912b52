"""Train an inverter: the frozen UNet plus the ControlNet's residuals, features as condition, under the
denoising loss of the pipeline's own prediction type.

Condition dropout (15% by default) replaces a sample's feature map with zeros, the "no features"
condition that classifier-free guidance contrasts against. Each step's batch, timesteps, noise and
dropout come from a generator seeded by (seed, step), so a resumed run continues with the same draws;
checkpoints hold the weights and Adam's state (safetensors) and the step (JSON).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from diffdissect.atomic import atomic_write_json, remove_stale_temporaries
from diffdissect.errors import DiffdissectError
from diffdissect.invert.model import Inverter, build_controlnet, controlled_prediction, load_inverter, save_inverter
from diffdissect.lock import DirectoryLock
from diffdissect.models.noising import add_noise, alphas_cumprod, denoiser_target
from diffdissect.models.target import Target
from diffdissect.optim_state import lr_factor, optimizer_tensors, restore_optimizer

PREVIOUS = "previous"  # the checkpoint before the current one, kept until the next one is complete
CHECKPOINT_FILES = ("inverter.safetensors", "optimizer.safetensors", "config.json")


@dataclass
class InvertTrainConfig:
    steps: int = 3000
    """training steps (optimiser updates)"""
    batch_size: int = 64
    """training images per step"""
    lr: float = 3e-4
    """AdamW learning rate (after warm-up; cosine decay to the end)"""
    warmup: int = 100
    """linear warm-up steps"""
    cond_dropout: float = 0.15
    """fraction of steps whose feature map is dropped (all zero): what guidance contrasts with"""
    hint_hidden: int = 64
    """channels of the hint block that maps the feature map to the latent grid"""
    checkpoint_every: int = 500
    """steps between checkpoints (weights and Adam state; a rerun resumes from the last)"""
    seed: int = 0
    """seed of the initialisation and of every per-step draw"""

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise DiffdissectError("steps and batch_size must be positive.")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise DiffdissectError(f"cond_dropout must lie in [0, 1), not {self.cond_dropout}.")


Batch = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # indices -> (latents x0, features)


def train_inverter(
    target: Target,
    batch_of: Batch,
    n_examples: int,
    feature_shape: tuple[int, int, int],
    config: InvertTrainConfig,
    out: str | Path,
    info: dict[str, Any],
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """`batch_of(indices)` gives clean latents and feature maps (precomputed, or computed on the fly for the
    FeatInv-style baseline). Resumes from `out` when it holds a checkpoint of the same run."""
    config.validate()
    with DirectoryLock(out, "invert train"):
        remove_stale_temporaries(Path(out))  # leftovers of a write a kill interrupted
        return _train_inverter(target, batch_of, n_examples, feature_shape, config, Path(out), info, progress)


def _train_inverter(
    target: Target,
    batch_of: Batch,
    n_examples: int,
    feature_shape: tuple[int, int, int],
    config: InvertTrainConfig,
    out: Path,
    info: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    if target.vae is None or target.text_encoder is None:
        raise DiffdissectError(
            "feature inversion needs a latent text-to-image pipeline (VAE, UNet, text encoder), "
            f"such as Stable Diffusion; {target.source} has no VAE or text encoder."
        )
    out = Path(out)
    unet = target.denoiser.eval().requires_grad_(False)
    latent_grid = tuple(
        unet.config.sample_size
        if isinstance(unet.config.sample_size, (list, tuple))
        else (unet.config.sample_size,) * 2
    )
    info = {
        **info,
        "feature_shape": list(feature_shape),
        "latent_grid": list(latent_grid),
        "hint_hidden": config.hint_hidden,
        "train": asdict(config),
        "pipeline": target.identity(),
    }
    inverter, optimiser, step, losses = _start_or_resume(out, unet, target, feature_shape, latent_grid, config, info)
    device = target.device
    inverter.to(device)
    text_states = target.text_embeddings([""])  # the empty prompt: features are the only condition
    n_timesteps = len(alphas_cumprod(target.scheduler))
    started = time.perf_counter()
    first = step
    inverter.train()
    with tqdm(total=config.steps, initial=step, desc="inverter", unit="step", disable=not progress) as bar:
        while step < config.steps:
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            idx = torch.randint(0, n_examples, (config.batch_size,), generator=g)
            x0, feats = batch_of(idx)
            # drawn on the CPU (the same draws on every device), then moved
            keep = (torch.rand(config.batch_size, generator=g, device="cpu") >= config.cond_dropout).float()[
                :, None, None, None
            ]
            t = torch.randint(0, n_timesteps, (config.batch_size,), generator=g, device="cpu")
            noise = torch.randn(x0.shape, generator=g, device="cpu")
            x0, feats, keep, t, noise = (v.to(device) for v in (x0, feats, keep, t, noise))
            noisy = add_noise(target.scheduler, x0, noise, t)
            pred = controlled_prediction(
                unet, inverter, noisy, t, text_states.expand(config.batch_size, -1, -1), feats * keep
            )
            loss = F.mse_loss(pred, denoiser_target(target.scheduler, x0, noise, t))
            for group in optimiser.param_groups:
                group["lr"] = config.lr * _lr_factor(step, config)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(inverter.parameters(), 1.0)
            optimiser.step()
            step += 1
            if not math.isfinite(loss.item()):
                raise DiffdissectError(
                    f"the inverter's loss became {loss.item()} at step {step}; the last checkpoint "
                    f"in {out} is kept. Lower --lr."
                )
            losses.append(loss.item())
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                _checkpoint(out, inverter, optimiser, step, losses)
    elapsed = time.perf_counter() - started
    if step == first and (out / "training.json").is_file():  # already finished: keep its record
        return json.loads((out / "training.json").read_text())
    # the file holds only what a rerun reproduces (byte-identical); timings are returned, not written
    record = {"steps": step, "final_loss": sum(losses[-100:]) / len(losses[-100:]) if losses else None}
    atomic_write_json(out / "training.json", record)
    return {
        **record,
        "trained_now": step - first,
        "seconds": elapsed,
        "steps_per_s": (step - first) / elapsed if elapsed > 0 and step > first else None,
    }


def _lr_factor(step: int, config: InvertTrainConfig) -> float:
    return lr_factor(step, config.steps, config.warmup)


def _start_or_resume(
    out: Path, unet, target: Target, feature_shape, latent_grid, config: InvertTrainConfig, info: dict[str, Any]
) -> tuple[Inverter, torch.optim.Optimizer, int, list[float]]:
    if (out / "config.json").is_file() or (out / PREVIOUS / "config.json").is_file():
        saved_dir = _consistent_checkpoint(out)
        saved = json.loads((saved_dir / "config.json").read_text())

        def settings(d: dict[str, Any]) -> dict[str, Any]:
            train = {k: v for k, v in (d.get("train") or {}).items() if k not in ("steps", "checkpoint_every")}
            return {**{k: d.get(k) for k in ("feature_shape", "classifier", "layer", "mode")}, "train": train}

        same, want = settings(saved), settings(info)
        if same != want:
            raise DiffdissectError(
                f"{out} holds an inverter trained with other settings ({same}); use a new --out to "
                "train this one, or the same settings to resume."
            )
        inverter = load_inverter(saved_dir, pipeline_identity=target.identity())
        inverter.info = info
        step = int(saved["state"].get("step", 0))
        optimiser = torch.optim.AdamW(inverter.parameters(), lr=config.lr, weight_decay=0.0)
        if (saved_dir / "optimizer.safetensors").is_file():
            restore_optimizer(optimiser, inverter, load_file(saved_dir / "optimizer.safetensors"))
        return inverter, optimiser, step, list(saved["state"].get("recent_losses", []))
    torch.manual_seed(config.seed)
    inverter = Inverter(build_controlnet(unet, feature_shape[0], latent_grid, config.hint_hidden), info)
    return inverter, torch.optim.AdamW(inverter.parameters(), lr=config.lr, weight_decay=0.0), 0, []


def _checkpoint_step(directory: Path) -> int | None:
    """The step of the checkpoint in `directory` when its three files agree on it, else None."""
    try:
        step = int(json.loads((directory / "config.json").read_text())["state"].get("step", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    on_disk = [_saved_step(directory / name) for name in ("inverter.safetensors", "optimizer.safetensors")]
    if on_disk[0] != step or on_disk[1] not in (None, step):
        return None
    return step


def _consistent_checkpoint(out: Path) -> Path:
    """The newest checkpoint whose files agree: `out`, or `out/previous` after an interrupted write."""
    if _checkpoint_step(out) is not None:
        return out
    if _checkpoint_step(out / PREVIOUS) is not None:
        warnings.warn(
            f"the checkpoint in {out} was interrupted while being written; resuming from the previous one "
            f"(step {_checkpoint_step(out / PREVIOUS)})",
            stacklevel=3,
        )
        return out / PREVIOUS
    raise DiffdissectError(
        f"the checkpoint in {out} is inconsistent (its files record different steps) and there is no "
        "intact previous checkpoint; delete the directory and train again."
    )


def _checkpoint(
    out: Path, inverter: Inverter, optimiser: torch.optim.Optimizer, step: int, losses: list[float]
) -> None:
    """Keep the current checkpoint as previous/ (hard links: no copy), then write the new one file by file."""
    if _checkpoint_step(out) is not None:
        staging = out / f".{PREVIOUS}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for name in CHECKPOINT_FILES:
            if (out / name).is_file():
                os.link(out / name, staging / name)
        shutil.rmtree(out / PREVIOUS, ignore_errors=True)
        os.replace(staging, out / PREVIOUS)
    try:
        save_inverter(
            inverter, out, optimizer_tensors(optimiser, inverter), state={"step": step, "recent_losses": losses[-100:]}
        )
    except OSError as exc:
        raise DiffdissectError(
            f"could not write the inverter checkpoint at step {step} in {out} ({exc.strerror or exc}); "
            f"the previous checkpoint is kept in {out / PREVIOUS}. Free space and run the same "
            "command again to resume."
        ) from exc


def _saved_step(path: Path) -> int | None:
    """The step recorded in a checkpoint file's safetensors metadata (None: no file or no record)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None
