"""The Decoding-Diffusion analysis on the shapes world, and its check against the planted truth."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffdissect.directions.prompts import build_prompt_set
from diffdissect.directions.run import BiasConfig, DirectionsConfig
from diffdissect.world.generator import WorldConfig

TEMPLATES = ["a {colour} {shape}", "a {shape}", "a {size} {shape}"]
ORDER = ["strong", "medium", "weak", "unbiased"]


def world_directions_config(world: WorldConfig, seeds: int = 256, **overrides: Any) -> DirectionsConfig:
    """Every shape with and without each colour and size; bias of 'a {shape}' over the colours (and over the
    sizes, where nothing is planted); prompts clustered by shape with the colour and size directions held out,
    each sample's map mean-pooled over positions first (position-free; docs/benchmarks.md compares it with the
    maps). No guidance: guidance sharpens samples towards the mode, and the question is what the model
    defaults to."""
    prompts = build_prompt_set(
        templates=TEMPLATES,
        slot_values={"colour": list(world.colours), "shape": list(world.shapes), "size": list(world.sizes)},
    )
    options: dict[str, Any] = dict(
        seeds=list(range(seeds)),
        guidance_scale=1.0,
        batch_size=64,
        bias=[
            BiasConfig("colour", list(world.colours), [f"a {s}" for s in world.shapes]),
            BiasConfig("size", list(world.sizes), [f"a {s}" for s in world.shapes]),
        ],
        cluster_by="shape",
        cluster_remove=["colour", "size"],
        cluster_pooling="mean",
    )
    options.update(overrides)
    return DirectionsConfig(prompts=prompts, **options)


def check_against_world(results: dict[str, Any], world: WorldConfig) -> dict[str, Any]:
    """The targets: latent scores ordered strong > medium > weak > unbiased; strong and unbiased CIs apart;
    unbiased not significant; image rates within 10 points of the planted rates; latent and image agree."""
    summary = results["summary"]
    rows = {r["subject"]: r for r in summary["families"]["colour"]["subjects"]}
    strength = {f"a {s}": world.bias_strength.get(s, "") for s in world.shapes}
    by_strength = {strength[s]: r for s, r in rows.items()}
    ordered = [s for s in ORDER if s in by_strength]
    scores = [by_strength[s]["score"] for s in ordered]
    out: dict[str, Any] = {
        "order": ordered,
        "scores": scores,
        "latent_order_correct": bool(np.all(np.diff(scores) < 0)),
    }
    if "strong" in by_strength and "unbiased" in by_strength:
        strong, unbiased = by_strength["strong"], by_strength["unbiased"]
        out["strong_unbiased_cis_apart"] = bool(strong["ci"][0] > unbiased["ci"][1])
        out["unbiased_not_significant"] = not unbiased["significant"]
        out["unbiased_p_holm"] = unbiased["p_holm"]
    errors = {}
    for s, r in rows.items():
        shape = s.split()[-1]
        if "image_rates" in r:
            errors[shape] = max(abs(r["image_rates"][c] - world.colour_given_shape[shape][c]) for c in world.colours)
    out["image_rate_max_error"] = errors
    out["image_rates_within_10_points"] = bool(errors) and max(errors.values()) <= 0.10
    agreement = summary["families"]["colour"].get("subject_agreement")
    out["subject_rank_agreement"] = agreement
    steps = results["bias"][summary["layer"]]["colour"]
    per_t = {}
    for tt in results["timesteps"]:
        vals = [
            steps[f"a {shape}"][str(tt)]["latent"]["score"]
            for shape in [next(sh for sh in world.shapes if world.bias_strength.get(sh) == b) for b in ordered]
        ]
        per_t[tt] = bool(np.all(np.diff(vals) < 0))
    out["order_correct_by_t"] = per_t
    clusters = summary.get("clusters", {})
    out["cluster_ari"] = clusters
    return out
