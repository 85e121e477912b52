"""How faithful is a reconstruction? Judged by the inverted classifier and by an independent network.

* feature cosine: the classifier's features of the reconstruction vs the original, pooled (mean over
  the grid) and per location (mean over locations of the cosine at each location);
* top-1 / top-5 agreement: the class of the original within the reconstruction's top 1 / top 5, under
  the inverted classifier and under the independent judge;
* a Frechet distance between originals and reconstructions in the judge's output space (all heads'
  logits side by side: low-dimensional, so a few hundred images estimate its covariance), beside the
  distance between the originals and an independent draw of as many real images (`reference`): what
  two real samples of this size differ by;
* for the shapes world, agreement on every factor (the attribute captioner's reading), with Wilson CIs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from diffdissect.invert.data import images_to_pixels
from diffdissect.invert.features import FeatureExtractor
from diffdissect.stats import wilson


def rate(hits: np.ndarray) -> dict[str, Any]:
    hits = np.asarray(hits, bool)
    return {
        "rate": float(hits.mean()) if len(hits) else float("nan"),
        "ci95": list(wilson(int(hits.sum()), len(hits))),
        "n": int(len(hits)),
    }


@torch.no_grad()
def feature_cosines(extractor: FeatureExtractor, originals: np.ndarray, recons: np.ndarray) -> dict[str, Any]:
    a, b = extractor(images_to_pixels(originals)), extractor(images_to_pixels(recons))
    pooled = F.cosine_similarity(a.mean(dim=(2, 3)), b.mean(dim=(2, 3)), dim=1)
    local = F.cosine_similarity(a, b, dim=1).mean(dim=(1, 2))
    return {
        "pooled": float(pooled.mean()),
        "pooled_per_image": pooled.numpy(),
        "per_location": float(local.mean()),
        "per_location_per_image": local.numpy(),
    }


def topk_agreement(logits_original: torch.Tensor, logits_recon: torch.Tensor, k: int) -> np.ndarray:
    reference = logits_original.argmax(1, keepdim=True)
    k = min(k, logits_recon.shape[1])
    return (logits_recon.topk(k, dim=1).indices == reference).any(1).numpy()


def judge_joint_logits(outputs: dict[str, torch.Tensor], first: str = "shape", second: str = "colour") -> torch.Tensor:
    """The judge's (first x second) class log-probabilities, from its two independent heads."""
    a, b = F.log_softmax(outputs[first], 1), F.log_softmax(outputs[second], 1)
    return (a[:, :, None] + b[:, None, :]).flatten(1)


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@torch.no_grad()
def evaluate_reconstructions(
    originals: np.ndarray,
    recons: np.ndarray,
    *,
    classifier: torch.nn.Module,
    extractor: FeatureExtractor,
    judge: torch.nn.Module | None = None,
    reference: np.ndarray | None = None,
) -> dict[str, Any]:
    """`originals` (N, H, W, 3), `recons` (N, H, W, 3) (one seed) -> the metrics as plain data."""
    po, pr = images_to_pixels(originals), images_to_pixels(recons)
    cos = feature_cosines(extractor, originals, recons)
    lo, lr = classifier(po), classifier(pr)
    out: dict[str, Any] = {
        "n": len(originals),
        "feature_cosine_pooled": cos["pooled"],
        "feature_cosine_per_location": cos["per_location"],
        "classifier_top1": rate(topk_agreement(lo, lr, 1)),
        "classifier_top5": rate(topk_agreement(lo, lr, 5)),
    }
    if judge is not None:
        jo, jr = judge(po), judge(pr)
        out["factors"] = {f: rate((jo[f].argmax(1) == jr[f].argmax(1)).numpy()) for f in jo}
        if {"shape", "colour"} <= set(jo):
            a, b = judge_joint_logits(jo), judge_joint_logits(jr)
            out["judge_top1"] = rate(topk_agreement(a, b, 1))
            out["judge_top5"] = rate(topk_agreement(a, b, 5))
        fo = torch.cat([jo[f] for f in jo], 1).numpy()
        fr = torch.cat([jr[f] for f in jr], 1).numpy()
        if len(fo) > 2 * fo.shape[1]:
            out["frechet"] = {
                "originals_vs_reconstructions": frechet_distance(fo, fr),
                "space": f"judge logits ({fo.shape[1]} dims)",
            }
            if reference is not None:
                ref = judge(images_to_pixels(reference))
                out["frechet"]["originals_vs_independent_real"] = frechet_distance(
                    fo, torch.cat([ref[f] for f in ref], 1).numpy()
                )
    return out
