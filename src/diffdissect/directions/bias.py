"""What does a prompt default to? The latent answer and the image answer, with uncertainty and a null.

Latent measure (per step): each sample's centred latent is compared (cosine) with every descriptor
direction of a family, and the profile is centred across the family (what is left is the preference
among the descriptors, not the sample's overall alignment). A subject's excess alignment with
descriptor d is its mean profile minus that of *reference* samples, the subject with each descriptor
named ("a red square", "a green square", ...; equal numbers per descriptor, so the reference is
balanced by construction). The bias score is the top descriptor's excess.

  * Cross-fitting: the seeds are split in two halves; a sample's profile is measured against the
    directions estimated on the *other* half (`cross_fitted_profile`), so no sample is scored on
    directions fitted to its own noise. The statistic is the mean over the two halves of each half's
    excess.
  * 95% CIs: percentile bootstrap over the subject's and the references' samples (seeds) within each
    half, the top descriptor held fixed.
  * Null: if the subject has no default, its samples are exchangeable with the pooled reference
    samples; the p-value permutes subject/reference membership within each half (the max over
    descriptors recomputed each time, so picking the top is accounted for). Given the other half's
    directions a half's profiles are fixed functions of its own samples, so the within-half
    permutation is exact and the directions need not be re-estimated per permutation; the test
    `test_cross_fitted_bias_p_values_are_uniform_without_bias` checks the calibration (KS). Without
    references, descriptors are permuted within each sample instead (exchangeable descriptors; a
    weaker null, reported as such).
  * Holm's adjustment across the subjects asked about.

Image measure: descriptor rates in the captions of the subject's samples (Wilson CIs), minus the
rates in the references' captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import spearmanr

from diffdissect.directions.compute import cosine_to_directions, directions
from diffdissect.directions.text import words_of
from diffdissect.errors import DataError
from diffdissect.stats import wilson


@dataclass
class BiasQuestion:
    subject: str  # a prompt of the set, e.g. "a square"
    family: list[str]  # descriptors, e.g. ["red", "green", "blue", "yellow"]
    family_name: str = "descriptors"
    references: dict[str, str] = field(default_factory=dict)  # descriptor -> reference prompt


def find_references(subject: str, family: list[str], prompts: list[str]) -> dict[str, str]:
    """Per descriptor, the prompt made of the subject's words plus that descriptor (any word order)."""
    want = sorted(words_of(subject))
    out = {}
    for d in family:
        target = sorted(want + words_of(d))
        for p in prompts:
            if sorted(words_of(p)) == target:
                out[d] = p
                break
    return out


def make_questions(subjects: list[str], family: list[str], family_name: str, prompts: list[str]) -> list[BiasQuestion]:
    """Questions for each subject; an unknown subject or a family of fewer than two is an error."""
    if len(family) < 2 or len(set(family)) != len(family):
        raise DataError(f"a descriptor family needs at least two distinct descriptors, got {family}.")
    missing = [s for s in subjects if s not in prompts]
    if missing:
        raise DataError(f"subject prompt(s) {missing} are not in the prompt set; add them (they must be sampled).")
    questions = []
    for s in subjects:
        refs = find_references(s, family, prompts)
        questions.append(BiasQuestion(s, list(family), family_name, refs if len(refs) == len(family) else {}))
    return questions


def family_profile(alignment: np.ndarray) -> np.ndarray:
    """Centre each sample's alignments across the family."""
    return alignment - alignment.mean(axis=1, keepdims=True)


def seed_halves(seeds: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N,) 0/1: the half of each sample, by its noise seed (every prompt has its seeds in both halves alike)."""
    seeds = np.asarray(seeds)
    unique = np.unique(seeds)
    if len(unique) < 2:
        raise DataError(
            f"cross-fitting needs at least two noise seeds per prompt; got {len(unique)}. Sample more "
            "seeds (--n-seeds) or turn cross-fitting off."
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    first = set(unique[order[: len(unique) // 2]].tolist())
    return np.array([0 if s in first else 1 for s in seeds.tolist()], dtype=np.int64)


def cross_fitted_profile(
    latents: np.ndarray,
    indicators: np.ndarray,
    valid: np.ndarray | None,
    columns: list[int],
    halves: np.ndarray,
    method: str = "mean_difference",
    alpha: float = 1.0,
) -> np.ndarray:
    """(N, K) family profiles where each half's samples are measured against the directions (and the centre)
    estimated on the other half only. `columns`: the family's term columns of `indicators`."""
    h = np.asarray(latents).reshape(len(latents), -1)
    valid = np.ones(len(h), bool) if valid is None else np.asarray(valid, bool)
    out = np.zeros((len(h), len(columns)))
    for half in (0, 1):
        mine, other = halves == half, halves != half
        dirs = directions(h[other], np.asarray(indicators)[other], method, valid[other], alpha)[columns]
        centre = h[other & valid].mean(0)
        out[mine] = family_profile(cosine_to_directions(h[mine], dirs, centre))
    return out


def _bootstrap_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    n = len(values)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
    return counts @ values / n  # (B, K)


def _permuted_excess(pool: np.ndarray, n_s: int, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """(P, K): subject mean minus reference mean with membership of the pooled rows permuted."""
    order = np.argsort(rng.random((permutations, len(pool))), axis=1)
    pick = np.zeros((permutations, len(pool)))
    np.put_along_axis(pick, order[:, :n_s], 1.0, axis=1)
    total = pool.sum(0)
    chosen = pick @ pool
    return chosen / n_s - (total[None] - chosen) / (len(pool) - n_s)


def latent_bias(
    profile: np.ndarray,
    subject: np.ndarray,
    references: list[np.ndarray] | None,
    *,
    halves: np.ndarray | None = None,
    resamples: int = 2000,
    permutations: int = 2000,
    seed: int = 0,
) -> dict:
    """Excess alignment per descriptor with CIs, the bias score (top descriptor) and its p-value.

    `profile`: (N, K) family-centred alignments (cross-fitted: `cross_fitted_profile`); `subject`: row
    indices of the subject's samples; `references`: row indices per descriptor's reference prompt, or
    None; `halves`: (N,) the cross-fitting half of each row (None: one part, the in-sample statistic).
    The excess is the mean over halves of each half's excess; bootstrap and permutations stay within
    halves."""
    rng = np.random.default_rng(seed)
    halves = np.zeros(len(profile), np.int64) if halves is None else np.asarray(halves)
    subject = np.asarray(subject)
    parts = [h for h in np.unique(halves[subject])]
    k = profile.shape[1]

    def rows_in(rows: np.ndarray, h: int) -> np.ndarray:
        return rows[halves[rows] == h]

    excess = np.zeros(k)
    boot = np.zeros((resamples, k))
    null_sum = np.zeros((permutations, k))
    for h in parts:
        subj = profile[rows_in(subject, h)]
        refs = [profile[rows_in(np.asarray(r), h)] for r in references] if references else None
        refs = [r for r in refs if len(r)] if refs else None
        ref_mean = np.concatenate(refs).mean(0) if refs else np.zeros(k)
        excess += (subj.mean(0) - ref_mean) / len(parts)
        part_boot = _bootstrap_means(subj, resamples, rng)
        if refs:
            part_boot = part_boot - np.mean([_bootstrap_means(r, resamples, rng) for r in refs], axis=0)
        boot += part_boot / len(parts)
        if refs:
            null_sum += _permuted_excess(np.concatenate([subj, *refs]), len(subj), permutations, rng) / len(parts)
        else:
            perm = np.argsort(rng.random((permutations, len(subj), k)), axis=2)
            null_sum += np.take_along_axis(np.broadcast_to(subj, perm.shape), perm, axis=2).mean(axis=1) / len(parts)
    top = int(np.argmax(excess))
    low, high = np.quantile(boot, [0.025, 0.975], axis=0)
    null = null_sum.max(axis=1)
    observed = excess.max()
    within = " within each cross-fitting half" if len(parts) > 1 else ""
    null_kind = (
        f"subject vs balanced references, membership permuted{within}"
        if references
        else f"descriptors permuted within each sample (no references found){within}"
    )
    p_value = float((1 + np.sum(null >= observed - 1e-12)) / (1 + permutations))
    return {
        "excess": excess.tolist(),
        "ci_low": low.tolist(),
        "ci_high": high.tolist(),
        "top": top,
        "score": float(excess[top]),
        "score_ci": [float(low[top]), float(high[top])],
        "p_value": p_value,
        "null": null_kind,
        "null_mean": float(null.mean()),
        "null_q95": float(np.quantile(null, 0.95)),
        "cross_fitted": len(parts) > 1,
    }


def image_rates(captions: list[str | None], rows: np.ndarray, family: list[str]) -> dict:
    """Descriptor rates among the captions of `rows` (failed captions left out), with Wilson CIs."""
    texts = [" " + " ".join(words_of(captions[i])) + " " for i in rows if captions[i] is not None]
    n = len(texts)
    rates, cis = [], []
    for d in family:
        key = " " + " ".join(words_of(d)) + " "
        hits = sum(key in t for t in texts)
        rates.append(hits / n if n else float("nan"))
        cis.append(list(wilson(hits, n)))
    return {"n": n, "rates": rates, "ci95": cis}


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    m = len(p_values)
    order = np.argsort(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def rank_agreement(latent: list[float], image: list[float]) -> dict:
    """Spearman correlation and whether the two orders are identical."""
    if len(latent) < 2:
        return {"spearman": float("nan"), "same_order": True, "same_top": True}
    rho = spearmanr(latent, image).statistic if len(set(latent)) > 1 and len(set(image)) > 1 else float("nan")
    return {
        "spearman": float(rho),
        "same_order": list(np.argsort(latent)) == list(np.argsort(image)),
        "same_top": int(np.argmax(latent)) == int(np.argmax(image)),
    }
