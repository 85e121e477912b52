"""What inversion shows: concept steering, feature composites, and what a fooled classifier 'sees'.

* steering: add alpha x a concept direction (the mean difference of features between two classes, a
  channel vector added at every location) and invert; how often does the attribute flip, and are the
  other factors kept?
* composites: splice the left half of one feature map with the right half of another and invert;
  each half of the reconstruction should hold its own source's content;
* robustness: corrupt the input (noise, blur, occlusion) or attack the classifier (PGD) and invert
  the features of the corrupted input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffdissect.data.transforms import pixels_to_uint8
from diffdissect.invert.data import images_to_pixels
from diffdissect.invert.evaluate import rate


def concept_direction(features: torch.Tensor, labels: np.ndarray, source: int, target: int) -> torch.Tensor:
    """(C,) mean pooled feature of class `target` minus that of class `source`."""
    pooled = features.mean(dim=(2, 3))
    labels = torch.as_tensor(labels)
    return pooled[labels == target].mean(0) - pooled[labels == source].mean(0)


def steer(features: torch.Tensor, direction: torch.Tensor, alpha: float) -> torch.Tensor:
    return features + alpha * direction[None, :, None, None]


def steering_outcome(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], factor: str, target_value: int
) -> dict:
    """Flip rate of `factor` to `target_value`; the other factors kept (as read before steering)."""
    flipped = after[factor] == target_value
    others = [f for f in before if f != factor]
    kept = np.all([after[f] == before[f] for f in others], axis=0)
    return {"flipped": rate(flipped), "others_kept": rate(kept), "flipped_and_kept": rate(flipped & kept)}


def splice(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Left half of the grid from `left`, right half from `right`."""
    out = left.clone()
    w = left.shape[-1]
    out[..., w // 2 :] = right[..., w // 2 :]
    return out


def region_colour(
    images: np.ndarray, palette: np.ndarray, background: np.ndarray, half: str, min_distance: float = 60.0
) -> np.ndarray:
    """Index of the palette colour nearest to the mean foreground colour in one half (-1 if none)."""
    w = images.shape[2]
    part = images[:, :, : w // 2] if half == "left" else images[:, :, w // 2 :]
    part = part.reshape(len(images), -1, 3).astype(np.float32)
    foreground = np.linalg.norm(part - background[None, None], axis=2) > min_distance
    out = np.full(len(images), -1)
    for i in range(len(images)):
        if foreground[i].sum() >= 4:
            mean = part[i][foreground[i]].mean(0)
            out[i] = int(np.argmin(np.linalg.norm(palette - mean[None], axis=1)))
    return out


# ---- corruptions and attacks (pixels in [-1, 1]) ------------------------------------------------------
def gaussian_noise(pixels: torch.Tensor, std: float = 0.4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)  # the same noise on every device
    return (pixels + std * torch.randn(pixels.shape, generator=g, device="cpu").to(pixels.device)).clamp(-1, 1)


def gaussian_blur(pixels: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=pixels.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = pixels.shape[1]
    out = F.conv2d(
        F.pad(pixels, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c
    )
    return F.conv2d(
        F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )


def occlude(pixels: torch.Tensor, size: int = 12, seed: int = 0) -> torch.Tensor:
    """A mid-grey square at a random place per image."""
    g = torch.Generator().manual_seed(seed)
    out = pixels.clone()
    h, w = pixels.shape[-2:]
    for i in range(len(out)):
        y, x = (int(v) for v in torch.randint(0, h - size + 1, (2,), generator=g))
        out[i, :, y : y + size, x : x + size] = 0.0
    return out


def pgd(
    classifier: torch.nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 8 / 127.5,
    steps: int = 10,
    step_size: float | None = None,
) -> torch.Tensor:
    """Untargeted L-infinity PGD against `classifier` (pixels in [-1, 1])."""
    step_size = step_size or eps / 4
    adv = pixels.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(classifier(adv), labels)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step_size * grad.sign()
        adv = (pixels + (adv - pixels).clamp(-eps, eps)).clamp(-1, 1)
    return adv.detach()


CORRUPTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "noise": gaussian_noise,
    "blur": gaussian_blur,
    "occlusion": occlude,
}


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return pixels_to_uint8(pixels)


@torch.no_grad()
def classify(classifier: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    return classifier(images_to_pixels(images)).argmax(1).numpy()


def seen_versus_truth(
    classifier_pred_on_input: np.ndarray, recon_class: np.ndarray, truth: np.ndarray
) -> dict[str, Any]:
    """Does the reconstruction show what the classifier predicted, or what was there?"""
    return {
        "classifier_accuracy_on_input": rate(classifier_pred_on_input == truth),
        "reconstruction_shows_prediction": rate(recon_class == classifier_pred_on_input),
        "reconstruction_shows_truth": rate(recon_class == truth),
    }
