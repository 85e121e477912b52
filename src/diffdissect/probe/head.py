"""A small attentive head on spatial maps (a light Diff-C): for users who want more than a linear read-out.

1x1 conv to `width` channels + a learned position embedding -> GELU -> 3x3 conv -> GELU -> attention pooling (a learned score per
location, softmax over locations) -> linear classifier. Trained with AdamW; the epoch with the best
validation accuracy is kept (early stopping), so the test split is touched once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class AttentiveHead(nn.Module):
    def __init__(self, channels: int, n_classes: int, width: int = 64, size: tuple[int, int] = (8, 8)):
        super().__init__()
        self.reduce = nn.Conv2d(channels, width, 1)
        self.position = nn.Parameter(torch.randn(1, width, *size, device="cpu") * 0.02)  # where a feature is can matter
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.score = nn.Conv2d(width, 1, 1)
        self.classify = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        h = F.gelu(self.mix(F.gelu(self.reduce(x) + self.position)))
        attention = self.score(h).flatten(1).softmax(-1)  # (B, HW)
        pooled = torch.einsum("bn,bcn->bc", attention, h.flatten(2))
        return self.classify(pooled)


@dataclass
class HeadFit:
    val_accuracy: float
    train_accuracy: float
    best_epoch: int
    test_pred: np.ndarray


def fit_attentive_head(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    x_test: torch.Tensor,
    n_classes: int,
    *,
    width: int = 64,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> HeadFit:
    """x_*: (n, C, H, W) spatial features (standardised per channel with the train rows); y_*: (n,) int64."""
    if x_train.dim() != 4:
        raise ValueError(
            f"the attentive head needs spatial maps (n, C, H, W); got shape {tuple(x_train.shape)}. "
            "Capture with --pooling none."
        )
    mean = x_train.float().mean((0, 2, 3), keepdim=True)
    std = x_train.float().std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    x_train, x_val, x_test = ((x.float() - mean) / std for x in (x_train, x_val, x_test))
    device = x_train.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    y_train, y_val = y_train.to(device), y_val.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same initial head on every device: built on the CPU, moved
        model = AttentiveHead(x_train.shape[1], n_classes, width, tuple(x_train.shape[2:])).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best = (-1.0, 0, {k: v.clone() for k, v in model.state_dict().items()})

    def predict(x: torch.Tensor) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return torch.cat([model(x[i : i + 512]).argmax(-1) for i in range(0, len(x), 512)])

    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=generator, device="cpu").to(device).split(batch_size):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = float((predict(x_val) == y_val).float().mean())
        if acc > best[0]:
            best = (acc, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    return HeadFit(
        val_accuracy=best[0],
        best_epoch=best[1],
        train_accuracy=float((predict(x_train) == y_train).float().mean()),
        test_pred=predict(x_test).cpu().numpy(),
    )
