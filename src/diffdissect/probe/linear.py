"""Multinomial logistic-regression probes for many cells and labels at once.

Every (cell, label, L2 strength) triple is an independent, strongly convex problem. Two solvers:

- `batched`: `batched_lbfgs` solves them all together (one `bmm` per evaluation) with a curvature
  history and a line search per problem, so each converges at its own rate. On an accelerator this
  fits every cell at once.
- `lbfgsb`: scipy's L-BFGS-B per problem (the solver scikit-learn uses), with a closed-form gradient
  in float32 torch matmuls and warm starts down the L2 grid (strongest first). On a CPU this is the
  faster path: the batched run pays for its slowest problem on every evaluation.

`solver="auto"` picks `lbfgsb` on the CPU and `batched` elsewhere; the fit records which ran.
Features are standardised with the training rows' mean and std. The L2 strength is chosen per
(cell, label) by validation cross-entropy.
Objective per problem: mean cross-entropy + l2/2 * ||W||^2 (intercept unpenalised), which is
scikit-learn's LogisticRegression with C = 1 / (l2 * n_train).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class LinearProbeFit:
    """Per (cell, task): chosen L2 and the chosen model's predictions; per (cell, l2, task): validation scores."""

    l2_grid: np.ndarray  # (R,)
    val_accuracy: np.ndarray  # (C, R, T)
    val_loss: np.ndarray  # (C, R, T)
    chosen: np.ndarray  # (C, T) index into l2_grid
    train_accuracy: np.ndarray  # (C, T) of the chosen model
    test_pred: np.ndarray  # (C, T, n_test) class indices from the chosen model
    iterations: int
    converged: bool
    max_grad: float
    solver: str = "batched"
    coef: np.ndarray | None = None  # (C, T, K, d) the chosen model's class weights on the raw features
    intercept: np.ndarray | None = None  # (C, T, K) and intercepts (standardisation folded in)

    @property
    def chosen_l2(self) -> np.ndarray:
        return self.l2_grid[self.chosen]


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """(C, n, d) blocks scaled by the train rows' per-cell, per-feature mean and std."""
    mean = train.mean(1, keepdim=True)
    std = train.std(1, keepdim=True, correction=0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def fit_probe_tasks(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    x_test: torch.Tensor,
    n_classes: list[int],
    *,
    train_mask: torch.Tensor | None = None,
    val_mask: torch.Tensor | None = None,
    l2_grid=DEFAULT_L2_GRID,
    max_iter: int = 500,
    tol: float = 1e-4,
    solver: str = "auto",
) -> LinearProbeFit:
    """Fit C cells x T label tasks x R L2 strengths in one batched run.

    x_*: (C, n_split, d) features (standardised here); y_*: (T, n_split) int64 class indices; task t has
    `n_classes[t]` classes (logits of the others are masked out). Rows whose mask is 0 (a missing
    label) do not count for that task. Everything runs on the features' device. `solver`: auto, batched or
    lbfgsb (module docstring); the fit records which ran.
    """
    if solver not in ("auto", "batched", "lbfgsb"):
        raise ValueError(f"solver must be auto, batched or lbfgsb, not {solver!r}")
    device = x_train.device
    if solver == "auto":
        solver = "lbfgsb" if device.type == "cpu" else "batched"
    raw_mean = x_train.float().mean(1, keepdim=True)
    raw_std = x_train.float().std(1, keepdim=True, correction=0).clamp_min(1e-6)
    x_train, x_val, x_test = standardise(x_train.float(), x_val.float(), x_test.float())
    cells, _, d = x_train.shape
    tasks, k = len(n_classes), max(n_classes)
    grid = torch.tensor(list(l2_grid), dtype=torch.float32, device=device)
    r = len(grid)
    y_train, y_val = y_train.to(device).clamp_min(0), y_val.to(device).clamp_min(0)
    m_train = (train_mask.to(device) if train_mask is not None else torch.ones_like(y_train, dtype=torch.bool)).float()
    m_val = (val_mask.to(device) if val_mask is not None else torch.ones_like(y_val, dtype=torch.bool)).float()
    absent = torch.full((tasks, k), float("-inf"), device=device)
    for t, n in enumerate(n_classes):
        absent[t, :n] = 0.0
    n_w = d * k

    def unpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x: (C, R, T, (d + 1) K)
        weight = x[..., :n_w].reshape(cells, r, tasks, d, k).permute(0, 3, 1, 2, 4).reshape(cells, d, r * tasks * k)
        bias = x[..., n_w:].reshape(cells, 1, r * tasks * k)
        return weight, bias

    def logits_of(x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:  # (C, n, R, T, K)
        weight, bias = unpack(x)
        return (torch.bmm(features, weight) + bias).view(cells, features.shape[1], r, tasks, k) + absent

    def losses(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (C, R, T)
        logp = torch.log_softmax(logits, dim=-1)
        target = y.t()[None, :, None, :, None].expand(cells, -1, r, -1, 1)
        nll = -logp.gather(-1, target).squeeze(-1)  # (C, n, R, T)
        weights = mask.t()[None, :, None, :]
        return (nll * weights).sum(1) / weights.sum(1).clamp_min(1)

    def value_and_grad(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = flat.detach().view(cells, r, tasks, -1).requires_grad_(True)
            squares = x[..., :n_w].pow(2).sum(-1)  # (C, R, T), intercepts unpenalised
            values = losses(logits_of(x, x_train), y_train, m_train) + 0.5 * grid[None, :, None] * squares
            (grad,) = torch.autograd.grad(values.sum(), x)  # independent problems: one backward
        return values.detach().reshape(-1), grad.reshape(len(flat), -1)

    if solver == "batched":
        start = torch.zeros(cells * r * tasks, (d + 1) * k, device=device)
        solution, iterations, converged, max_grad = batched_lbfgs(value_and_grad, start, max_iter=max_iter, tol=tol)
        solution = solution.view(cells, r, tasks, -1)
    else:
        solution, iterations, converged, max_grad = _lbfgsb_all(
            x_train, y_train, m_train, n_classes, k, grid, max_iter=max_iter, tol=tol
        )

    def logits(features: torch.Tensor) -> torch.Tensor:
        return logits_of(solution, features)

    with torch.no_grad():
        val_acc = ((logits(x_val).argmax(-1) == y_val.t()[None, :, None, :]).float() * m_val.t()[None, :, None, :]).sum(
            1
        ) / m_val.t()[None, :, None, :].sum(1).clamp_min(1)
        val_loss = losses(logits(x_val), y_val, m_val)
        chosen = val_loss.argmin(1)  # (C, T): validation cross-entropy

        def predict(x: torch.Tensor) -> torch.Tensor:  # (C, T, n) at the chosen strength
            pred = logits(x).argmax(-1)  # (C, n, R, T)
            pick = chosen[:, None, None, :].expand(-1, x.shape[1], 1, -1)
            return pred.gather(2, pick).squeeze(2).transpose(1, 2)

        # the chosen model on the raw features: x W / std + (b - (mean / std) W)
        pick = chosen[:, :, None, None].expand(-1, -1, 1, solution.shape[-1])  # (C, T, 1, (d + 1) K)
        best = solution.view(cells, r, tasks, -1).transpose(1, 2).gather(2, pick).squeeze(2)  # (C, T, (d + 1) K)
        weight_std = best[..., :n_w].reshape(cells, tasks, d, k)
        coef = weight_std / raw_std.reshape(cells, 1, d, 1)
        intercept = best[..., n_w:] - (raw_mean.reshape(cells, 1, d, 1) * coef).sum(2)
        train_pred = predict(x_train)
        train_acc = ((train_pred == y_train[None]).float() * m_train[None]).sum(-1) / m_train.sum(-1).clamp_min(1)
        test_pred = predict(x_test)
    return LinearProbeFit(
        l2_grid=grid.cpu().numpy().astype(np.float64),
        val_accuracy=val_acc.cpu().numpy(),
        val_loss=val_loss.cpu().numpy(),
        chosen=chosen.cpu().numpy(),
        train_accuracy=train_acc.cpu().numpy(),
        test_pred=test_pred.cpu().numpy(),
        iterations=iterations,
        converged=converged,
        max_grad=max_grad,
        solver=solver,
        coef=coef.transpose(2, 3).cpu().numpy(),
        intercept=intercept.cpu().numpy(),
    )


def _lbfgsb_all(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    m_train: torch.Tensor,
    n_classes: list[int],
    k: int,
    grid: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, int, bool, float]:
    """Every (cell, task) with scipy's L-BFGS-B, down the L2 grid from the strongest (warm starts); returns the
    solutions in the batched layout (C, R, T, (d + 1) K) with the absent classes' entries zero."""
    from scipy.optimize import minimize

    cells, _, d = x_train.shape
    tasks, r = len(n_classes), len(grid)
    out = torch.zeros(cells, r, tasks, (d + 1) * k, dtype=torch.float32, device=x_train.device)
    most, worst, converged = 0, 0.0, True
    for c in range(cells):
        for t, n_k in enumerate(n_classes):
            rows = m_train[t] > 0
            x, y = x_train[c][rows], y_train[t][rows]
            onehot = torch.zeros(len(y), n_k, dtype=torch.float32, device=x.device)
            onehot[torch.arange(len(y), device=x.device), y] = 1.0
            scale = 1.0 / max(len(y), 1)
            start = np.zeros((d + 1) * n_k)
            for i in sorted(range(r), key=lambda i: -float(grid[i])):
                l2 = float(grid[i])

                def fun(
                    flat: np.ndarray, l2: float = l2, x=x, onehot=onehot, n_k=n_k, scale=scale
                ) -> tuple[float, np.ndarray]:
                    theta = torch.from_numpy(flat).to(torch.float32)
                    w, b = theta[: d * n_k].view(d, n_k), theta[d * n_k :]
                    logits = torch.addmm(b, x, w)
                    logp = torch.log_softmax(logits, dim=-1)
                    loss = -(logp * onehot).sum() * scale + 0.5 * l2 * float(w.pow(2).sum())
                    g = (logp.exp() - onehot) * scale
                    grad = torch.cat([(x.t() @ g + l2 * w).flatten(), g.sum(0)])
                    return float(loss), grad.double().numpy()

                result = minimize(
                    fun, start, jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-12}
                )
                start = result.x
                most = max(most, int(result.nit))
                grad_max = float(np.abs(result.jac).max())
                worst = max(worst, grad_max)
                converged &= grad_max <= tol * 10 or bool(result.success)
                theta = torch.from_numpy(result.x).to(torch.float32)
                w, b = theta[: d * n_k].view(d, n_k), theta[d * n_k :]
                block = torch.zeros(d + 1, k, dtype=torch.float32, device=x.device)
                block[:d, :n_k], block[d, :n_k] = w, b
                out[c, i, t] = torch.cat([block[:d].flatten(), block[d]])
    return out, most, converged, worst


@torch.no_grad()
def batched_lbfgs(
    value_and_grad,
    x0: torch.Tensor,
    *,
    max_iter: int = 500,
    tol: float = 1e-5,
    history: int = 10,
    max_backtracks: int = 20,
):
    """Minimise P independent smooth functions at once. value_and_grad(x (P, D)) -> (f (P,), g (P, D)).

    Every problem keeps its own curvature pairs, search direction (two-loop recursion) and Armijo
    step, so each converges at its own rate; a problem whose max |gradient| <= tol stops moving, as does
    one whose line search finds no decrease (float precision reached). Returns (x, iterations, all
    converged to tol, max |gradient|).
    """
    x = x0.clone()
    f, g = value_and_grad(x)
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    stalled = torch.zeros(len(x), dtype=torch.bool, device=x.device)  # line search found no decrease
    iterations = 0
    for iterations in range(1, max_iter + 1):
        active = (g.abs().amax(1) > tol) & ~stalled
        if not active.any():
            iterations -= 1
            break
        q = g.clone()
        alphas = []
        for s, y, rho in reversed(pairs):
            a = rho * (s * q).sum(1)
            q -= a[:, None] * y
            alphas.append(a)
        if pairs:
            s, y, rho = pairs[-1]
            yy = (y * y).sum(1)
            gamma = torch.where((rho > 0) & (yy > 0), (s * y).sum(1) / yy.clamp_min(1e-30), torch.ones_like(yy))
            q *= gamma[:, None]
        else:
            q *= (1.0 / g.abs().sum(1).clamp_min(1e-12)).clamp(max=1.0)[:, None]
        for (s, y, rho), a in zip(pairs, reversed(alphas)):
            q += (a - rho * (y * q).sum(1))[:, None] * s
        direction = -q
        slope = (g * direction).sum(1)
        uphill = slope >= 0  # a bad curvature estimate: fall back to -g
        direction[uphill] = -g[uphill]
        slope = torch.where(uphill, -(g * g).sum(1), slope)
        direction[~active] = 0
        step = torch.ones(len(x), device=x.device)
        for _ in range(max_backtracks):
            candidate = x + step[:, None] * direction
            f_new, g_new = value_and_grad(candidate)
            accepted = (f_new <= f + 1e-4 * step * slope) | ~active
            if accepted.all():
                break
            step = torch.where(accepted, step, step * 0.5)
        stalled |= ~accepted
        keep = accepted[:, None]
        candidate = torch.where(keep, candidate, x)
        f_new, g_new = torch.where(accepted, f_new, f), torch.where(keep, g_new, g)
        s, y = candidate - x, g_new - g
        sy = (s * y).sum(1)
        pairs.append((s, y, torch.where(sy > 1e-10, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))))
        pairs = pairs[-history:]
        x, f, g = candidate, f_new, g_new
    max_grad = float(g.abs().max())
    return x, iterations, bool(max_grad <= tol), max_grad


def fit_linear_probes(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    x_test: torch.Tensor,
    n_classes: int,
    **kwargs,
) -> LinearProbeFit:
    """One label: y_* (n_split,). Returns arrays without the task axis: chosen (C,), test_pred (C, n_test)."""
    fit = fit_probe_tasks(x_train, y_train[None], x_val, y_val[None], x_test, [n_classes], **kwargs)
    fit.val_accuracy, fit.val_loss = fit.val_accuracy[..., 0], fit.val_loss[..., 0]
    fit.chosen, fit.train_accuracy, fit.test_pred = fit.chosen[:, 0], fit.train_accuracy[:, 0], fit.test_pred[:, 0]
    if fit.coef is not None and fit.intercept is not None:
        fit.coef, fit.intercept = fit.coef[:, 0], fit.intercept[:, 0]
    return fit


def fit_sklearn_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    *,
    l2_grid=DEFAULT_L2_GRID,
    max_iter: int = 1000,
) -> dict:
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
