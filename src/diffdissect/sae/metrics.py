"""SAE quality on held-out tokens: centred FVU, L0, dead fraction and per-latent firing frequency."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def evaluate(sae, x: torch.Tensor, *, batch_size: int = 8192) -> dict[str, Any]:
    """Metrics of `sae` on raw inputs `x` (n, d_in).

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (centred: a model that outputs the mean scores 1).
    L0 = mean number of non-zero codes per token. A latent is dead here if it never fires on `x`.
    """
    was_training = sae.training
    sae.eval()
    n = len(x)
    device = sae.W_dec.device
    fired = torch.zeros(sae.config.n_latents, dtype=torch.float64, device=device)
    error, nonzero = 0.0, 0.0
    for start in range(0, n, batch_size):
        batch = x[start : start + batch_size].to(device, torch.float32)
        codes, _ = sae.encode(batch)
        error += float((sae.decode(codes) - batch).double().pow(2).sum())
        active = codes.values > 0
        nonzero += float(active.sum())
        fired.index_add_(0, codes.indices[active], torch.ones(int(active.sum()), dtype=torch.float64, device=device))
    x64 = x.to(device, torch.float64)
    total = float((x64 - x64.mean(0)).pow(2).sum())
    sae.train(was_training)
    frequency = fired / max(n, 1)
    return {
        "tokens": n,
        "fvu": error / total if total > 0 else float("nan"),
        "l0": nonzero / max(n, 1),
        "dead_fraction": float((fired == 0).double().mean()),
        "frequency": frequency.cpu().tolist(),
    }
