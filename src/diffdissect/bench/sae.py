"""`diffdissect bench sae`: TopK SAE training throughput against EleutherAI sparsify, side by side.

Same data, same config (d_in, expansion, k, batch), same optimiser (Adam, same lr), the same
initial weights (ours, copied into the peer) and the same batches in the same order. Each timed round trains ours and the peer
for `steps` steps, alternating which goes first; tokens/s is the median over rounds. FVU is the
held-out FVU after the same number of steps (the timed ones and `quality_steps` more on fresh batches). The bound is the time of the three dense encoder-shaped
matmuls per batch (forward x @ W_enc^T, and the two backward products a dense TopK SAE would run).

The data are synthetic activations with known sparse structure (sparse non-negative combinations of
a fixed dictionary of unit atoms plus noise); no model is needed.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from diffdissect.sae.metrics import evaluate
from diffdissect.sae.model import SAEConfig, TopKSAE
from diffdissect.sae.train import apply_update, sae_loss

PEER_PACKAGE = "eai-sparsify"


def synthetic_activations(
    tokens: int, d_in: int, *, atoms: int = 4096, active: int = 24, seed: int = 0, dictionary_seed: int = 12345
) -> torch.Tensor:
    """Sparse non-negative combinations of one fixed dictionary (`dictionary_seed`), drawn with `seed`."""
    dictionary = torch.nn.functional.normalize(
        torch.randn(atoms, d_in, generator=torch.Generator().manual_seed(dictionary_seed)), dim=-1
    )
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(tokens, d_in)
    for start in range(0, tokens, 8192):
        n = min(8192, tokens - start)
        idx = torch.randint(0, atoms, (n, active), generator=gen)
        coef = torch.rand(n, active, generator=gen) * 2
        out[start : start + n] = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=coef, mode="sum")
    return out + 0.05 * torch.randn(tokens, d_in, generator=gen) + 0.3


def peer_available(install: bool) -> Any:
    try:
        return importlib.import_module("sparsify")
    except ImportError:
        if not install:
            return None
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", PEER_PACKAGE], capture_output=True, text=True
    )
    if result.returncode != 0:
        print(f"could not install {PEER_PACKAGE} (skipping the peer): {result.stderr.strip()[-300:]}")
        return None
    importlib.invalidate_caches()
    return importlib.import_module("sparsify")


def dense_bound_seconds(batch: int, d_in: int, n_latents: int, repeats: int = 3) -> float:
    x, w, g = torch.randn(batch, d_in), torch.randn(n_latents, d_in), torch.randn(batch, n_latents)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        _ = x @ w.t()  # forward pre-activations
        _ = g.t() @ x  # dW_enc
        _ = g @ w  # dx
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run_sae_benchmark(
    *,
    d_in: int = 512,
    expansion: int = 16,
    k: int = 32,
    batch: int = 4096,
    steps: int = 8,
    rounds: int = 3,
    quality_steps: int = 100,
    install: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    n_latents = d_in * expansion
    lr = 2e-4 / (n_latents / 2**14) ** 0.5
    train = synthetic_activations(batch * steps, d_in, seed=seed)
    heldout = synthetic_activations(8192, d_in, seed=seed + 1)
    batches = list(train.split(batch))
    sparsify = peer_available(install)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ours = TopKSAE(SAEConfig(d_in=d_in, n_latents=n_latents, k=k, normalise="none"))
    ours.initialise_from(train[:16384])
    ours_opt = torch.optim.Adam(ours.parameters(), lr=lr, eps=6.25e-10)

    def ours_step(x: torch.Tensor) -> None:
        loss, *_ = sae_loss(ours, x, None, 0.0)
        apply_update(ours, ours_opt, loss)

    peer = peer_opt = None
    if sparsify is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peer = sparsify.SparseCoder(d_in, sparsify.SparseCoderConfig(expansion_factor=expansion, k=k), device="cpu")
        with torch.no_grad():  # the same starting point: our data-driven initialisation
            peer.encoder.weight.copy_(ours.W_enc)
            peer.encoder.bias.copy_(ours.b_enc)
            peer.W_dec.copy_(ours.W_dec)
            peer.b_dec.copy_(ours.b_dec)
        peer_opt = torch.optim.Adam(peer.parameters(), lr=lr, eps=6.25e-10)

    def peer_step(x: torch.Tensor) -> None:
        out = peer(x)
        peer_opt.zero_grad(set_to_none=True)
        out.fvu.backward()
        peer.remove_gradient_parallel_to_decoder_directions()
        peer_opt.step()
        peer.set_decoder_norm_to_unit_norm()

    runners = {"diffdissect": ours_step} | ({"sparsify": peer_step} if peer is not None else {})
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for step in runners.values():  # warm-up: one step each
        step(batches[0])
    for r in range(rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            start = time.perf_counter()
            for x in batches:
                runners[name](x)
            rates[name].append(len(batches) * batch / (time.perf_counter() - start))
    bound = batch / dense_bound_seconds(batch, d_in, n_latents)
    for i in range(quality_steps):  # untimed: more training on fresh batches before comparing FVU
        x = synthetic_activations(batch, d_in, seed=seed + 100 + i)
        for step in runners.values():
            step(x)
    trained_steps = 1 + rounds * steps + quality_steps
    fvu = {"diffdissect": evaluate(ours, heldout)["fvu"]}
    if peer is not None:
        with torch.no_grad():
            fvu["sparsify"] = float(
                sum((peer(x).sae_out - x).pow(2).sum() for x in heldout.split(batch))
                / (heldout - heldout.mean(0)).pow(2).sum()
            )
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {
            "d_in": d_in,
            "expansion": expansion,
            "n_latents": n_latents,
            "k": k,
            "batch": batch,
            "steps_per_round": steps,
            "rounds": rounds,
            "lr": lr,
            "steps_before_fvu": trained_steps,
        },
        "tokens_per_s": {name: round(statistics.median(v)) for name, v in rates.items()},
        "tokens_per_s_all": {name: [round(x) for x in v] for name, v in rates.items()},
        "dense_three_matmul_bound_tokens_per_s": round(bound),
        "heldout_fvu_after_equal_steps": {name: round(v, 4) for name, v in fvu.items()},
        "peer": None if sparsify is None else f"{PEER_PACKAGE} {getattr(sparsify, '__version__', '')}".strip(),
    }
    ours_rate = result["tokens_per_s"]["diffdissect"]
    result["fraction_of_bound"] = round(ours_rate / bound, 3)
    passes = {"fraction_of_bound_ge_0.9": result["fraction_of_bound"] >= 0.9}
    if peer is not None:
        result["speedup_vs_peer"] = round(ours_rate / result["tokens_per_s"]["sparsify"], 3)
        passes["speedup_ge_1.25"] = result["speedup_vs_peer"] >= 1.25
        passes["fvu_equal_or_better"] = fvu["diffdissect"] <= fvu["sparsify"] + 1e-3
    result["pass"] = passes
    line = f"SAE training, d_in {d_in}, {expansion}x ({n_latents} latents), k {k}, batch {batch}: diffdissect {ours_rate:,} tokens/s"
    if peer is not None:
        line += f", sparsify {result['tokens_per_s']['sparsify']:,} tokens/s -> {result['speedup_vs_peer']:.2f}x"
    print(line)
    print(
        f"  dense 3-matmul bound {round(bound):,} tokens/s -> {100 * result['fraction_of_bound']:.0f}% of it; "
        f"held-out FVU after {trained_steps} equal steps: {result['heldout_fvu_after_equal_steps']}"
    )
    return result
