"""Causal columns for SAE features: turn each top latent up, and ablate it, while sampling; judge the change.

For each chosen latent j of an SAE (its layer read from the SAE's config), two edits are sampled over
prompts x seeds: `sae-set` (j set to alpha x the layer's typical per-location norm, at every location
and step) and `sae-zero`. Per edit and attribute, the judge's readings are compared with the unedited
sample of the same seed: the rate at which the attribute changed, and the value it most often changed to,
with Wilson intervals. `sae features --causal-model` merges these into features.json and the browser.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffdissect.errors import SpecError
from diffdissect.intervene.steer import Judge, SteerConfig, run_steer
from diffdissect.models.target import Target
from diffdissect.stats import wilson


@dataclass
class CausalConfig:
    """What the causal columns of `sae features` sample."""

    top: int = 8
    """latents measured: those with the best AUROC per label value, highest first"""
    prompts: list[str] = field(default_factory=lambda: [""])
    """prompts sampled with each latent turned up and ablated"""
    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    """sampling seeds per prompt"""
    alpha: float = 4.0
    """strength of 'turned up', in units of the layer's typical per-location norm"""
    steps: int = 10
    """sampler steps"""
    guidance: float = 4.0
    """classifier-free guidance scale"""


def top_latents(features: dict[str, Any], top: int) -> list[int]:
    """The latents that are some label value's best by AUROC, highest AUROC first, at most `top`: the held-out
    choice (chosen on half A, AUROC on half B) when the feature analysis made one, else the max over latents."""
    chosen = features.get("heldout", {}).get("best_latent_per_value") or features.get("best_latent_per_value", {})
    best: dict[int, float] = {}
    for values in chosen.values():
        for entry in values.values():
            best[entry["latent"]] = max(best.get(entry["latent"], 0.0), entry["auroc"])
    return sorted(best, key=lambda j: -best[j])[:top]


def causal_effects(
    target: Target,
    sae_dir: str | Path,
    layer: str,
    latents: list[int],
    judge: Judge,
    config: CausalConfig,
    out: str | Path,
) -> dict[int, dict[str, Any]]:
    """{latent: {"up": {attribute: {...}}, "ablate": {...}}} measured by `judge` (see the module docstring)."""
    if not latents:
        raise SpecError("no latents to measure: the feature analysis found no label values (pass --labels).")
    edits = [f"sae-set@{layer}={sae_dir}#{j}" for j in latents] + [f"sae-zero@{layer}={sae_dir}#{j}" for j in latents]
    steer = SteerConfig(
        prompts=list(config.prompts),
        edits=edits,
        seeds=list(config.seeds),
        alphas=[config.alpha],
        steps=config.steps,
        guidance=config.guidance,
        attributes=judge.attributes,
        save_images=False,
    )
    out = Path(out)
    result = run_steer(target, steer, out, judge, progress=False)
    import json

    readings = json.loads((out / "readings.json").read_text())["images"]
    by_image = {r["image"]: r["values"] for r in readings}
    base = {name.split("/", 1)[1]: v for name, v in by_image.items() if name.startswith("base/")}
    table: dict[int, dict[str, Any]] = {}
    for k, j in enumerate(latents):
        entry = {}
        for kind, index, alpha in (("up", k, f"a{config.alpha:g}"), ("ablate", len(latents) + k, "a-")):
            edited = {name.split("/", 2)[2]: v for name, v in by_image.items() if name.startswith(f"e{index}/{alpha}/")}
            entry[kind] = _changes(base, edited, judge.attributes)
        table[j] = entry
    del result
    return table


def _changes(base: dict[str, dict], edited: dict[str, dict], attributes: dict[str, list[str]]) -> dict[str, Any]:
    out = {}
    for attribute in attributes:
        pairs = [(base[n][attribute], edited[n][attribute]) for n in edited if base[n][attribute] is not None]
        changed = [b != e for b, e in pairs]
        to = Counter(e for b, e in pairs if b != e and e is not None).most_common(1)
        out[attribute] = {
            "changed": sum(changed) / len(changed) if changed else None,
            "ci": wilson(sum(changed), len(changed)),
            "n": len(changed),
            "to": to[0][0] if to else None,
            "to_rate": to[0][1] / len(pairs) if to else None,
        }
    return out
