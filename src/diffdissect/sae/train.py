"""Training TopK SAEs on store slices: AuxK for dead latents, unit-norm decoder, resumable, NaN-safe.

BatchTopK runs are saved in their inference form: JumpReLU with one threshold, calibrated on the final
weights (`TopKSAE.calibrate_threshold`; the training-time running average is recorded beside it), so
the reported held-out FVU and L0 are those of the model that is saved and used.

Loss = FVU + aux_alpha * AuxK, both normalised by the batch's centred variance. AuxK (Gao et al.)
reconstructs the main reconstruction's residual from the top `k_aux` pre-activations of dead
latents (no firing for `dead_window` tokens), scaled by min(1, dead / k_aux). The learning rate
defaults to 2e-4 / sqrt(n_latents / 2^14), the scaling fitted in Gao et al.; Adam with warm-up and a
linear decay over the last fifth of training.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from diffdissect.atomic import remove_stale_temporaries
from diffdissect.devices import resolve_device, resolve_dtype
from diffdissect.distributed import SINGLE, Dist
from diffdissect.errors import DiffdissectError, SpecError, StoreError
from diffdissect.lock import DirectoryLock
from diffdissect.models.identity import comparable
from diffdissect.optim_state import lr_factor, optimizer_tensors, restore_optimizer
from diffdissect.paths import safe_name
from diffdissect.sae.checkpoint import has_checkpoint, is_legacy, load_sae, load_state, read_config, save_checkpoint
from diffdissect.sae.data import SliceData
from diffdissect.sae.metrics import evaluate
from diffdissect.sae.model import SAEConfig, TopKSAE
from diffdissect.store import open_store
from diffdissect.store.manifest import Manifest

CALIBRATION_TOKENS = 65536  # training tokens that set BatchTopK's inference threshold on the final weights


class NonFiniteTrainingError(DiffdissectError):
    """NaN or inf in the inputs or the loss; training stopped with the last good checkpoint kept."""


@dataclass
class TrainConfig:
    layer: str
    """the store layer the SAE reads"""
    t: int
    """the stored timestep the SAE reads"""
    tokens: bool = False
    """every spatial location is a token (needs a --pooling none capture); else pooled rows"""
    expansion: int | None = 8
    """n_latents = expansion x d_in, unless n_latents is given"""
    n_latents: int | None = None
    """dictionary size (instead of expansion)"""
    k: int = 32
    """active latents per token"""
    variant: Literal["topk", "batchtopk"] = "topk"
    """topk: k latents per token; batchtopk: k per token on average over a batch"""
    lr: float | None = None
    """learning rate [2e-4 / sqrt(n_latents / 2^14)]"""
    batch_size: int = 4096
    """tokens per step"""
    steps: int | None = None
    """optimiser steps (instead of epochs)"""
    epochs: float | None = None
    """passes over the training tokens [10]"""
    aux_alpha: float = 1 / 32
    """weight of the auxiliary loss that revives dead latents"""
    dead_window: int | None = None
    """tokens without firing that make a latent dead [min(10M, 1 epoch)]"""
    heldout_fraction: float = 0.1
    """fraction of the data held out for the metrics"""
    normalise: str = "scale"
    """input normalisation: scale (E||x||^2 = d_in) or none"""
    seed: int = 0
    """seed of the initialisation and the batch order"""
    checkpoint_every: int = 250
    """optimiser steps between checkpoints"""
    device: str = "cpu"
    """where the SAE trains: cpu, cuda, cuda:N, mps (a checkpoint resumes on any device)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the dense encoder matmul (float32, bfloat16, float16); weights and optimiser stay float32"""
    mix_shards: int = 4
    """the shuffle buffer, in shards: each batch mixes tokens from row ranges of every shard in a pool this big"""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown SAE training options {unknown}; known: {sorted(known)}")
        return cls(**data)

    def run_name(self) -> str:
        size = f"n{self.n_latents}" if self.n_latents else f"x{self.expansion}"
        return f"{self.layer}@t={self.t}-{'tok' if self.tokens else 'pool'}-{self.variant}-k{self.k}-{size}"


def sae_config(config: TrainConfig, d_in: int) -> SAEConfig:
    if config.n_latents is None and not config.expansion:
        raise SpecError("give n_latents or expansion")
    n_latents = config.n_latents or config.expansion * d_in
    return SAEConfig(d_in=d_in, n_latents=n_latents, k=config.k, variant=config.variant, normalise=config.normalise)


def train_sae(
    store: str | Path, config: TrainConfig, out: str | Path, *, progress: bool = True, dist: Dist = SINGLE
) -> dict[str, Any]:
    """Train (or resume, or return the finished) SAE for one slice into `out`. Returns its summary.

    Distributed (`dist` from torchrun/accelerate): data parallel. Each rank trains on its own images
    (a disjoint share of the store) with batch_size / world tokens per step; gradients are averaged
    across ranks (all-reduce), dead-latent counters and the BatchTopK threshold are combined, so all
    ranks hold the same weights. Rank 0 writes the checkpoints; it holds `out`'s write lock while it trains."""
    out = Path(out)
    resolve_device(config.device), resolve_dtype(config.dtype)  # bad options fail before `out` is created
    Manifest.load(Path(store))
    with DirectoryLock(out, "sae train") if dist.is_main else contextlib.nullcontext():
        if dist.is_main:
            remove_stale_temporaries(out)  # leftovers of a write a kill interrupted
        return _train_sae(store, config, out, progress, dist)


def _train_sae(store: str | Path, config: TrainConfig, out: Path, progress: bool, dist: Dist) -> dict[str, Any]:
    device, compute_dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    if config.mix_shards < 1:
        raise SpecError(f"mix_shards must be at least 1, not {config.mix_shards}")
    reader = open_store(store)
    if config.layer not in reader.layers or config.t not in reader.timesteps:
        raise StoreError(
            f"the store has no slice {config.layer} @ t={config.t}; stored layers: {reader.layers}, "
            f"timesteps: {reader.timesteps}"
        )
    data = SliceData(
        reader, config.layer, config.t, config.tokens, config.heldout_fraction, part=(dist.rank, dist.world_size)
    )
    sae_cfg = sae_config(config, data.d_in)
    sae_cfg.validate()
    train_tokens = int(dist.all_reduce_(torch.tensor([data.train_tokens], dtype=torch.float64, device="cpu")).item())
    if config.batch_size % dist.world_size:
        raise SpecError(
            f"batch_size {config.batch_size} does not split evenly over {dist.world_size} ranks; use a "
            f"multiple of {dist.world_size}."
        )
    fewest = -int(dist.all_reduce_(torch.tensor([-data.train_tokens], dtype=torch.float64, device="cpu"), "max").item())
    if fewest < 1:
        raise SpecError(
            f"a rank has no training tokens: {train_tokens} tokens over {dist.world_size} ranks; use fewer ranks."
        )
    batch_size = min(config.batch_size, dist.world_size * fewest)  # every rank can fill its share of a batch
    rank_batch = batch_size // dist.world_size
    steps = config.steps or max(1, math.ceil((config.epochs or 10) * train_tokens / batch_size))
    dead_window = config.dead_window or min(10_000_000, train_tokens)
    lr = config.lr or 2e-4 / math.sqrt(sae_cfg.n_latents / 2**14)
    info = {
        "name": config.run_name(),
        "sae": sae_cfg.to_json(),
        "train": asdict(config),
        "slice": {
            "store": str(store),
            "store_identity": reader.manifest.content_identity(),
            "model": comparable(reader.manifest.model or {}),
            "layer": config.layer,
            "t": config.t,
            "d_in": data.d_in,
            "train_tokens": train_tokens,
        },
        "resolved": {"steps": steps, "batch_size": batch_size, "lr": lr, "dead_window": dead_window},
    }

    if dist.enabled:
        info["ranks"] = dist.world_size
    sae, state, start = _start_or_resume(out, config, sae_cfg, info, data, device)
    sae.compute_dtype = compute_dtype
    if start and state.get("_info", {}).get("ranks", 1) != dist.world_size:
        raise SpecError(
            f"{out} was trained with {state['_info'].get('ranks', 1)} rank(s); resume it with the same "
            f"number (now {dist.world_size}), or use another --out."
        )
    if start >= steps and "metrics" in state.get("_info", {}):
        return state["_info"]
    if dist.enabled and not start:  # one initialisation for all ranks: rank 0's
        for tensor in [*sae.parameters(), *sae.buffers()]:
            dist.broadcast_(tensor.data)
    optimiser = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    if start:
        restore_optimizer(optimiser, sae, state)
    since_fired = state.get("since_fired", torch.zeros(sae_cfg.n_latents, dtype=torch.float64, device=device))
    stream = data.batches(rank_batch, seed=config.seed, device=device, mix_shards=config.mix_shards, skip=start)
    sae.train()
    last = {}
    began = time.perf_counter()
    try:
        with tqdm(
            total=steps, initial=start, desc=config.run_name(), disable=not progress or not dist.is_main, unit="step"
        ) as bar:
            for step in range(start, steps):
                x = next(stream)
                if not torch.isfinite(x).all():
                    _stop(
                        out,
                        step,
                        "the input batch holds NaN or inf values (check the capture: `diffdissect store verify`)",
                    )
                if (
                    compute_dtype == torch.float16
                    and (x * sae.input_scale).abs().amax() > torch.finfo(torch.float16).max
                ):
                    _stop(
                        out,
                        step,
                        "the input batch overflows float16 (values beyond 65504 after scaling); train with "
                        "--dtype bfloat16 or float32",
                    )
                dead = since_fired >= dead_window
                loss, fvu, auxk, codes = sae_loss(sae, x, dead if dead.any() else None, config.aux_alpha)
                if not torch.isfinite(loss):
                    hint = " or use --dtype bfloat16: float16 overflowed" if compute_dtype == torch.float16 else ""
                    _stop(
                        out,
                        step,
                        f"the loss became {float(loss.detach())} (lower the learning rate, now {lr:.2e}{hint})",
                    )
                for group in optimiser.param_groups:
                    group["lr"] = lr * _lr_factor(step, steps)
                apply_update(sae, optimiser, loss, dist)
                fired = torch.zeros(sae_cfg.n_latents, device=device)
                fired[codes.indices[codes.values > 0]] = 1.0
                dist.all_reduce_(fired, "max")
                since_fired += batch_size
                since_fired[fired > 0] = 0
                if sae_cfg.variant == "batchtopk":
                    _update_threshold(sae, codes)
                    if dist.enabled:
                        sae.threshold.copy_(dist.all_reduce_(sae.threshold.detach().clone()) / dist.world_size)
                last = {
                    "fvu": float(fvu),
                    "l0": float((codes.values > 0).sum(1).float().mean()),
                    "dead": float(dead.double().mean()),
                    "auxk": float(auxk),
                }
                bar.set_postfix(fvu=f"{last['fvu']:.3f}", l0=f"{last['l0']:.1f}", dead=f"{100 * last['dead']:.1f}%")
                bar.update(1)
                done = step + 1
                if (done % config.checkpoint_every == 0 or done == steps) and dist.is_main:
                    _checkpoint(out, sae, optimiser, since_fired, {**info, "step": done, "last_batch": last})
    finally:
        stream.close()
    seconds = time.perf_counter() - began
    inference = {"form": "topk"}
    if sae_cfg.variant == "batchtopk":  # JumpReLU at one threshold, set on the final weights
        running = float(sae.threshold)
        calibration = data.sample(min(data.train_tokens, CALIBRATION_TOKENS))
        sae.calibrate_threshold(calibration)
        if dist.enabled:
            sae.threshold.copy_(dist.all_reduce_(sae.threshold.detach().clone()) / dist.world_size)
        inference = {
            "form": "jumprelu",
            "threshold": float(sae.threshold),
            "threshold_running_average": running,
            "calibration_tokens": len(calibration),
        }
    heldout = data.heldout()
    metrics = evaluate(sae, heldout)
    metrics["heldout_unfired_fraction"] = metrics.pop("dead_fraction")
    metrics["dead_fraction"] = float((since_fired >= dead_window).double().mean())  # the training window's view
    summary = {
        **info,
        "step": steps,
        "last_batch": last,
        "inference": inference,
        "metrics": {k: v for k, v in metrics.items() if k != "frequency"},
        "train_seconds": round(seconds, 2),
        "tokens_per_s": round((steps - start) * batch_size / max(seconds, 1e-9)),
    }
    if dist.is_main:
        _checkpoint(
            out, sae, optimiser, since_fired, summary, frequency=torch.tensor(metrics["frequency"], device="cpu")
        )
    dist.barrier()
    return summary


def train_saes(
    store: str | Path, configs: list[TrainConfig], out: str | Path, *, progress: bool = True, dist: Dist = SINGLE
) -> list[dict]:
    """A sweep: each config trains into out/<run name>."""
    names = [safe_name(c.run_name()) for c in configs]
    if len(set(names)) != len(names):
        raise SpecError(f"two runs of the sweep share a name: {names}")
    return [train_sae(store, c, Path(out) / name, progress=progress, dist=dist) for c, name in zip(configs, names)]


# ---- internals --------------------------------------------------------------------------------------
def apply_update(sae: TopKSAE, optimiser: torch.optim.Optimizer, loss: torch.Tensor, dist: Dist = SINGLE) -> None:
    """One optimiser step that keeps decoder rows on the unit sphere (gradients averaged over ranks)."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if dist.enabled:
        for p in sae.parameters():
            if p.grad is not None:
                dist.all_reduce_(p.grad).div_(dist.world_size)
    sae.remove_parallel_gradient()
    optimiser.step()
    sae.normalise_decoder()


def sae_loss(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor | None, aux_alpha: float):
    codes, aux = sae.encode(x, aux_mask=dead)
    x_hat = sae.decode(codes)
    scale = sae.input_scale
    total = ((x - x.mean(0)) * scale).pow(2).sum().clamp_min(1e-12)
    error = (x_hat - x) * scale
    fvu = error.pow(2).sum() / total
    auxk = torch.zeros((), device=x.device)
    if aux is not None:
        e_hat = sae.decode(aux, bias=False) * scale
        weight = min(1.0, float(dead.sum()) / sae.config.aux_k)
        auxk = weight * (e_hat + error.detach()).pow(2).sum() / total  # e_hat should predict -error = x - x_hat
    return fvu + aux_alpha * auxk, fvu.detach(), auxk.detach(), codes


def _lr_factor(step: int, steps: int) -> float:
    """Warm-up over 5% of the steps (at most 1000), linear decay over the last fifth."""
    return lr_factor(step, steps, max(1, min(1000, steps // 20)), decay="linear", decay_from=int(steps * 0.8))


@torch.no_grad()
def _update_threshold(sae: TopKSAE, codes) -> None:
    kept = codes.values[codes.values > 0]
    if kept.numel():
        sae.threshold.mul_(0.99).add_(0.01 * kept.min())


# options that do not change what is learnt: a run may resume with other values
RESUMABLE_ACROSS = ("device", "checkpoint_every")


def _start_or_resume(
    out: Path, config: TrainConfig, sae_cfg: SAEConfig, info: dict, data: SliceData, device: torch.device
):
    if has_checkpoint(out):
        saved = read_config(out)
        defaults = asdict(TrainConfig(layer=config.layer, t=config.t))
        was = {**defaults, **saved.get("train", {})}  # older checkpoints lack newer options: their defaults
        differ = [k for k in asdict(config) if k not in RESUMABLE_ACROSS and was.get(k) != asdict(config)[k]]
        if differ or saved.get("sae") != sae_cfg.to_json():
            raise SpecError(
                f"{out} holds an SAE trained with other settings ({', '.join(differ) or 'sae'} differ); "
                "use another --out or delete it to start over"
            )
        old, new = saved.get("slice", {}), info["slice"]
        differ = [
            f"slice.{k}" for k in ("store_identity", "layer", "t", "d_in", "train_tokens") if old.get(k) != new[k]
        ]
        differ += [
            f"slice.store_identity.{k}"
            for k in new["store_identity"]
            if (old.get("store_identity") or {}).get(k) != new["store_identity"][k]
        ]
        if differ:
            raise SpecError(
                f"{out} holds an SAE trained on another store ({old.get('store')}; differs in: "
                f"{', '.join(differ)}). Refusing to report or continue it as this store's: use another "
                "--out, or delete it to start over."
            )
        if is_legacy(out) and "metrics" not in saved:
            raise SpecError(
                f"{out} holds an unfinished SAE written by an older diffdissect, whose weights, optimiser "
                "state and config were separate files that an interruption could leave at different steps; "
                "it cannot be resumed safely. Delete it or use another --out."
            )
        sae, _ = load_sae(out, d_in=data.d_in, device=device)
        state = dict(load_state(out, device))
        state["_info"] = saved
        return sae, state, int(saved.get("step", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        sae = TopKSAE(sae_cfg, device="cpu").to(device)  # the same initial weights on every device
    sample = data.sample(min(data.train_tokens, 16384), device=device)
    bad = int((~torch.isfinite(sample).all(1)).sum())
    if bad:
        raise NonFiniteTrainingError(
            f"training stopped at step 0 (initialisation): {bad} of {len(sample)} sampled "
            f"{config.layer} @ t={config.t} inputs hold NaN or inf; check the capture with "
            "`diffdissect store verify`; no checkpoint was written yet"
        )
    sae.initialise_from(sample)
    return sae, {}, 0


def _checkpoint(
    out: Path,
    sae: TopKSAE,
    optimiser: torch.optim.Optimizer,
    since_fired: torch.Tensor,
    info: dict,
    frequency: torch.Tensor | None = None,
) -> None:
    if not all(torch.isfinite(p).all() for p in sae.parameters()):
        _stop(out, info.get("step", 0), "the weights became NaN or inf after an update")
    state = {"since_fired": since_fired.clone(), **optimizer_tensors(optimiser, sae)}
    if frequency is not None:
        state["heldout_frequency"] = frequency
    save_checkpoint(out, sae, info, state)


def _stop(out: Path, step: int, why: str) -> None:
    kept = read_config(out).get("step") if has_checkpoint(out) else None
    where = (
        f"the last good checkpoint (step {kept}) is kept in {out}"
        if kept is not None
        else "no checkpoint was written yet"
    )
    raise NonFiniteTrainingError(f"training stopped at step {step}: {why}; {where}")
