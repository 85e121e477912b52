"""Classifiers trained on the shapes world: a CNN and a ViT (inverted by FeatInv), and an independent
attribute captioner that predicts every factor and writes a caption (it judges generated images).

Each is a plain nn.Module saved as safetensors + config.json (never pickle) and loaded with
:func:`load_classifier`. Inputs are (B, 3, 32, 32) tensors in [-1, 1].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffdissect.data.transforms import uint8_to_pixels
from diffdissect.errors import DiffdissectError
from diffdissect.runtime import seeded, version
from diffdissect.world.generator import FACTORS, WorldConfig, sample_world
from diffdissect.world.training import run_steps

WEIGHTS_FORMAT = 1


class ShapesCNN(nn.Module):
    """Conv net over 32x32 images. Spatial feature maps: stem 32x32x32, block1 64x16x16, block2 128x8x8."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width}
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU())
        self.block1 = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.GroupNorm(8, 4 * w),
            nn.SiLU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1),
            nn.GroupNorm(8, 4 * w),
            nn.SiLU(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class ShapesViT(nn.Module):
    """A small ViT: 4x4 patches (8x8 = 64 tokens) + CLS; `blocks.N` output (B, 65, dim)."""

    def __init__(
        self, num_classes: int, dim: int = 64, depth: int = 4, heads: int = 4, patch: int = 4, image_size: int = 32
    ):
        super().__init__()
        self.config = {
            "num_classes": num_classes,
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "patch": patch,
            "image_size": image_size,
        }
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(x)[:, 0])


class AttributeCaptioner(nn.Module):
    """Predicts every factor of the world (one head each) and writes a full caption.

    A different architecture (max-pooled conv net with BatchNorm-free residual-less stages) and a
    different seed from the CNN/ViT, so its judgement is independent of the models it judges.
    """

    def __init__(self, factor_sizes: dict[str, int], width: int = 24):
        super().__init__()
        self.config = {"factor_sizes": dict(factor_sizes), "width": width}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * w * 16, 128),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({f: nn.Linear(128, n) for f, n in factor_sizes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {f: head(h) for f, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        return {f: logits.argmax(1).cpu().numpy() for f, logits in self(x).items()}


# ---- classes of the world for the CNN / ViT ---------------------------------------------------------
def class_names(world: WorldConfig) -> list[str]:
    """The CNN/ViT classes: every (colour, shape) pair, e.g. 'red square'."""
    return [f"{c} {s}" for s in world.shapes for c in world.colours]


def class_labels(world: WorldConfig, factors: dict[str, np.ndarray]) -> np.ndarray:
    return factors["shape"] * len(world.colours) + factors["colour"]


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return uint8_to_pixels(images)


# ---- training ---------------------------------------------------------------------------------------
def train_classifier(
    model: nn.Module,
    world: WorldConfig,
    *,
    steps: int,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    desc: str = "classifier",
) -> list[dict[str, float]]:
    """Train on fresh world images every step (uniform shape/colour so every class is seen)."""
    balanced = balanced_world(world)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()

    def step(i: int) -> dict[str, float]:
        b = sample_world(batch, seed=40_000_000 + seed * 1_000_000 + i, config=balanced)
        x = images_to_tensor(b.images)
        out = model(x)
        if isinstance(out, dict):
            loss = cast(torch.Tensor, sum(F.cross_entropy(out[f], torch.from_numpy(b.factors[f])) for f in out))
        else:
            loss = F.cross_entropy(out, torch.from_numpy(class_labels(world, b.factors)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss.item()}

    with seeded(seed):
        history = run_steps(steps, step, desc=desc, progress=progress)
    model.eval().requires_grad_(False)
    return history


def balanced_world(world: WorldConfig) -> WorldConfig:
    """The same world with colour independent of shape (classifiers must not learn the planted bias)."""
    uniform = {s: {c: 1.0 / len(world.colours) for c in world.colours} for s in world.shapes}
    return WorldConfig.from_json({**world.to_json(), "colour_given_shape": uniform})


@torch.no_grad()
def factor_accuracy(
    captioner: AttributeCaptioner, world: WorldConfig, n: int = 2000, seed: int = 99
) -> dict[str, float]:
    """Held-out accuracy of the captioner per factor (balanced world, unseen seed)."""
    b = sample_world(n, seed=50_000_000 + seed, config=balanced_world(world))
    pred = captioner.predict(images_to_tensor(b.images))
    return {f: float((pred[f] == b.factors[f]).mean()) for f in FACTORS}


@torch.no_grad()
def class_accuracy(model: nn.Module, world: WorldConfig, n: int = 2000, seed: int = 98) -> float:
    b = sample_world(n, seed=50_000_000 + seed, config=balanced_world(world))
    pred = model(images_to_tensor(b.images)).argmax(1).numpy()
    return float((pred == class_labels(world, b.factors)).mean())


# ---- save / load ------------------------------------------------------------------------------------
MODEL_CLASSES = {cls.__name__: cls for cls in (ShapesCNN, ShapesViT, AttributeCaptioner)}


def save_classifier(model: nn.Module, directory: Path, extra: dict[str, Any] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    config = {
        "class": type(model).__name__,
        "kwargs": model.config,
        "weights_format": WEIGHTS_FORMAT,
        "diffdissect_version": version(),
        **(extra or {}),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def load_classifier(directory: str | Path) -> nn.Module:
    """Load a classifier saved by :func:`save_classifier` (safetensors + JSON)."""
    directory = Path(directory)
    config_path, weights = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise DiffdissectError(
            f"no classifier at {directory} (config.json + model.safetensors expected); "
            "rebuild the shapes world with `diffdissect toy build`."
        )
    config = json.loads(config_path.read_text())
    if config.get("weights_format") != WEIGHTS_FORMAT or config.get("class") not in MODEL_CLASSES:
        raise DiffdissectError(
            f"{directory} holds weights in format {config.get('weights_format')!r} "
            f"({config.get('class')!r}); this diffdissect reads format {WEIGHTS_FORMAT}. "
            "Rebuild them with `diffdissect toy build`."
        )
    model = MODEL_CLASSES[config["class"]](**config["kwargs"])
    model.load_state_dict(load_file(weights))
    return model.eval().requires_grad_(False)
