"""Multinomial logistic-regression probes for many cells at once (one batched L-BFGS run).

Every (cell, L2 strength) pair is an independent, strongly convex problem; their sum is minimised
jointly, so the optimum of each is the optimum of the sum. Features are standardised with the
training rows' mean and std. The L2 strength is chosen per cell by validation cross-entropy.
Objective per problem: mean cross-entropy + l2/2 * ||W||^2 (intercept unpenalised), which is
scikit-learn's LogisticRegression with C = 1 / (l2 * n_train).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class LinearProbeFit:
    """Per cell: chosen L2 and the chosen model's predictions; per (cell, l2): validation scores."""

    l2_grid: np.ndarray          # (R,)
    val_accuracy: np.ndarray     # (C, R)
    val_loss: np.ndarray         # (C, R)
    chosen: np.ndarray           # (C,) index into l2_grid
    train_accuracy: np.ndarray   # (C,) of the chosen model
    test_pred: np.ndarray        # (C, n_test) class indices from the chosen model
    iterations: int
    converged: bool
    max_grad: float

    @property
    def chosen_l2(self) -> np.ndarray:
        return self.l2_grid[self.chosen]


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """(C, n, d) blocks scaled by the train rows' per-cell, per-feature mean and std."""
    mean = train.mean(1, keepdim=True)
    std = train.std(1, keepdim=True, correction=0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def fit_linear_probes(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                      x_test: torch.Tensor, n_classes: int, *, l2_grid=DEFAULT_L2_GRID, max_iter: int = 500,
                      tol: float = 1e-5) -> LinearProbeFit:
    """Fit C cells x R L2 strengths in one batched run.

    x_*: (C, n_split, d) float features (standardised here); y_*: (n_split,) or (C, n_split) int64.
    """
    x_train, x_val, x_test = standardise(x_train.float(), x_val.float(), x_test.float())
    cells, _, d = x_train.shape
    grid = torch.tensor(list(l2_grid), dtype=torch.float32)
    r, k = len(grid), n_classes
    y_train, y_val = (y.expand(cells, -1) if y.dim() == 1 else y for y in (y_train, y_val))
    weight = torch.zeros(cells, d, r * k, requires_grad=True)
    bias = torch.zeros(cells, 1, r * k, requires_grad=True)

    def logits(x: torch.Tensor) -> torch.Tensor:               # (C, n, R, K)
        return (torch.bmm(x, weight) + bias).view(cells, x.shape[1], r, k)

    def losses(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:   # (C, R) mean cross-entropy
        logp = F.log_softmax(logits(x), dim=-1)
        target = y[:, :, None, None].expand(-1, -1, r, 1)
        return -logp.gather(-1, target).squeeze(-1).mean(1)

    def objective() -> torch.Tensor:
        penalty = 0.5 * (grid * weight.view(cells, d, r, k).pow(2).sum((1, 3))).sum()
        return losses(x_train, y_train).sum() + penalty

    optimiser = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=tol,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = objective()
        value.backward()
        return value

    optimiser.step(closure)
    state = optimiser.state[optimiser._params[0]]
    iterations = int(state.get("n_iter", 0))
    with torch.enable_grad():
        closure()
    max_grad = float(max(weight.grad.abs().max(), bias.grad.abs().max()))
    with torch.no_grad():
        val_logits = logits(x_val)
        val_acc = (val_logits.argmax(-1) == y_val[:, :, None]).float().mean(1)
        val_loss = losses(x_val, y_val)
        chosen = val_loss.argmin(1)      # validation cross-entropy: a proper score, rarely tied
        pick = chosen[:, None, None].expand(-1, -1, 1)
        train_pred = logits(x_train).argmax(-1).gather(2, pick.expand(-1, x_train.shape[1], 1)).squeeze(-1)
        test_pred = logits(x_test).argmax(-1).gather(2, pick.expand(-1, x_test.shape[1], 1)).squeeze(-1)
    return LinearProbeFit(
        l2_grid=grid.numpy().astype(np.float64), val_accuracy=val_acc.numpy(), val_loss=val_loss.numpy(),
        chosen=chosen.numpy(), train_accuracy=(train_pred == y_train).float().mean(1).numpy(),
        test_pred=test_pred.numpy(), iterations=iterations, converged=iterations < max_iter, max_grad=max_grad)


def fit_sklearn_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                      x_test: np.ndarray, *, l2_grid=DEFAULT_L2_GRID, max_iter: int = 1000) -> dict:
    """The same protocol for one cell with scikit-learn (the reference the batched fit is checked against)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    xt, xv, xs = (scaler.transform(x) for x in (x_train, x_val, x_test))
    best = None
    for i, l2 in enumerate(l2_grid):
        model = LogisticRegression(C=1.0 / (l2 * len(xt)), max_iter=max_iter).fit(xt, y_train)
        acc = float((model.predict(xv) == y_val).mean())
        loss = float(log_loss(y_val, model.predict_proba(xv), labels=model.classes_))
        if best is None or loss < best[0]:
            best = (loss, acc, i, model)
    _, acc, index, model = best
    return {"chosen": index, "l2": float(l2_grid[index]), "test_pred": model.predict(xs), "val_accuracy": acc}
