"""Decoding-Diffusion analysis end to end: sample trajectories, caption, directions, bias, clusters.

Layout of a run directory:
  trajectories/     the trajectory store (resumable: an interrupted run continues where it stopped)
  captions.json     one caption (or the captioner's error) per sample, saved batch by batch
  prompts.json      the prompt set with slot values
  directions/       every term's direction per layer and step (safetensors) + terms.json
  results.json      all figures (plain data); the report section is built from it
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from diffdissect.atomic import atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from diffdissect.capture.spec import TrajectoryConfig
from diffdissect.capture.trajectory import capture_trajectories
from diffdissect.directions.bias import (
    cross_fitted_profile,
    family_profile,
    holm,
    image_rates,
    latent_bias,
    make_questions,
    rank_agreement,
    seed_halves,
)
from diffdissect.directions.captioners import Captioner, caption_images
from diffdissect.directions.cluster import (
    ClusterFit,
    ClusterStep,
    ari_with_null,
    cluster_prompts,
    project_out,
    prompt_means,
    spatial_mean,
)
from diffdissect.directions.compute import METHODS, cosine_to_directions, directions
from diffdissect.directions.prompts import Prompt
from diffdissect.directions.text import term_indicators
from diffdissect.errors import DataError, SpecError
from diffdissect.lock import DirectoryLock
from diffdissect.models.target import Target
from diffdissect.paths import safe_name
from diffdissect.result import to_json_value
from diffdissect.store import open_store
from diffdissect.store.writer import canonical_safetensors

SOURCES = ("captions", "prompts")
CLUSTER_POOLING = ("none", "mean")
HEADLINE_RULE = (
    "fixed in advance, not chosen on any score: the first layer at `headline_step` (default the last, least noisy step)"
)


@dataclass
class BiasConfig:
    family_name: str  # e.g. "colour"
    family: list[str]  # e.g. ["red", "green", "blue", "yellow"]
    subjects: list[str]  # prompts of the set, e.g. ["a square", "a circle"]


@dataclass
class DirectionsConfig:
    prompts: list[Prompt]
    """the prompts sampled (each with its template slots, if any)"""
    seeds: list[int] = field(default_factory=lambda: list(range(32)))
    """noise seeds per prompt"""
    layers: list[str] = field(default_factory=lambda: ["mid_block"])
    """layers to record (mid_block: h-space)"""
    steps: int = TrajectoryConfig.steps
    """sampler steps"""
    guidance_scale: float = 7.5
    """guidance scale"""
    batch_size: int = 64
    """trajectories per sampler call and per committed shard"""
    shard_size: int | None = None
    """trajectories per committed shard (the unit of resume) [batch_size]"""
    dtype: str = "float16"
    """stored dtype of the recorded activations"""
    method: Literal["mean_difference", "ridge"] = "mean_difference"
    """how a word's direction is estimated: mean difference (with / without the word) or ridge regression"""
    text_source: str = "captions"
    """the texts directions come from: captions or prompts"""
    ridge_alpha: float = 1.0
    """ridge regression's L2 strength"""
    max_words: int = 2
    """longest phrase a direction is made for (2: words and two-word phrases)"""
    min_count: int = 2
    """a term needs at least this many samples with it and this many without it to get a direction"""
    bias: list[BiasConfig] = field(default_factory=list)
    """descriptor families and the subjects whose defaults are measured over them"""
    cluster_by: str | None = None
    """a template slot whose grouping the clustering is scored on, e.g. shape"""
    cluster_remove: list[str] = field(default_factory=list)
    """bias families whose directions are all projected out before clustering (e.g. colour and size)"""
    cluster_pooling: Literal["none", "mean"] = "none"
    """each sample's summary before the prompt mean: none (the flattened map) or mean (over positions)"""
    cross_fit: bool = True
    """score bias on directions estimated on the other half of the seeds (else in-sample, the old statistic)"""
    headline_step: str | int = "last"
    """timestep of the headline figures: last (the cleanest latent) or a timestep t"""
    resamples: int = 2000
    """bootstrap resamples"""
    permutations: int = 2000
    """permutations of the significance tests"""
    save_directions: bool = True
    """write the directions to the run directory"""
    seed: int = 0
    """seed of the seed halves, the resampling and the clustering"""

    def validate(self) -> None:
        if self.method not in METHODS:
            raise SpecError(f"method must be one of {METHODS}, not {self.method!r}.")
        if self.text_source not in SOURCES:
            raise SpecError(f"text_source must be one of {SOURCES}, not {self.text_source!r}.")
        if self.cluster_remove is None or isinstance(self.cluster_remove, str):  # older configs: one family or None
            self.cluster_remove = [self.cluster_remove] if self.cluster_remove else []
        unknown = [f for f in self.cluster_remove if f not in [b.family_name for b in self.bias]]
        if unknown:
            raise SpecError(
                f"cluster_remove names no bias family: {unknown}; families: {[b.family_name for b in self.bias]}."
            )
        if self.cluster_pooling not in CLUSTER_POOLING:
            raise SpecError(f"cluster_pooling must be one of {CLUSTER_POOLING}, not {self.cluster_pooling!r}.")
        if self.cross_fit and len(set(self.seeds)) < 2:
            raise SpecError("cross-fitted bias needs at least two seeds per prompt; add seeds or set cross_fit=False.")
        if self.cluster_by:
            slotted = [p for p in self.prompts if self.cluster_by in p.slots]
            if len({p.slots[self.cluster_by] for p in slotted}) < 2:
                known = sorted({s for p in self.prompts for s in p.slots})
                raise SpecError(
                    f"cluster_by={self.cluster_by!r}: fewer than two groups among the prompts' slots "
                    f"(slots: {known or 'none; use templates'})."
                )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["prompts"] = [p.to_json() for p in self.prompts]
        return out


def run_directions(
    target: Target, config: DirectionsConfig, out: str | Path, captioner: Captioner | None, *, progress: bool = True
) -> dict[str, Any]:
    config.validate()
    out = Path(out)
    with DirectoryLock(out, "directions run"):
        remove_stale_temporaries(out)  # leftovers of a write a kill interrupted
        return _run_directions(target, config, out, captioner, progress)


def _run_directions(
    target: Target, config: DirectionsConfig, out: Path, captioner: Captioner | None, progress: bool
) -> dict[str, Any]:
    texts = [p.text for p in config.prompts]
    questions = {b.family_name: make_questions(b.subjects, b.family, b.family_name, texts) for b in config.bias}
    if config.text_source == "captions" and captioner is None:
        raise SpecError("directions from captions need a captioner; pass one or use text_source='prompts'.")

    cost = _sample(target, config, out / "trajectories", progress)
    atomic_write_json(out / "prompts.json", [p.to_json() for p in config.prompts])
    store = open_store(out / "trajectories")
    rows = store.rows()
    prompt_index = np.array([r["source_index"] for r in rows])
    prompt_texts = [texts[i] for i in prompt_index]
    captions = _captions(store, rows, captioner, out / "captions.json", progress) if captioner else None

    keep = [w for b in config.bias for w in b.family]
    indicators = {
        "prompts": term_indicators(prompt_texts, max_words=config.max_words, min_count=config.min_count, keep=keep)
    }
    if captions is not None:
        indicators["captions"] = term_indicators(
            captions["captions"], max_words=config.max_words, min_count=config.min_count, keep=keep
        )
    source = indicators[config.text_source]
    for b in config.bias:
        source.require(b.family, config.text_source)

    rows_of = {p.text: np.nonzero(prompt_index == i)[0] for i, p in enumerate(config.prompts)}
    halves = seed_halves(np.array([r["seed"] for r in rows]), config.seed) if config.cross_fit else None
    images = (
        {name: _image_measures(qs, rows_of, captions) for name, qs in questions.items()}
        if captions is not None
        else None
    )
    timesteps = store.timesteps
    headline_t = _headline(timesteps, config.headline_step)
    results: dict[str, Any] = {
        "config": config.to_json(),
        "captioner": getattr(captioner, "name", None),
        "timesteps": timesteps,
        "headline": {"layer": config.layers[0], "t": headline_t, "selected": HEADLINE_RULE},
        "samples": len(rows),
        "cost": cost,
        "terms": {k: {"terms": v.terms, "skipped": v.skipped} for k, v in indicators.items()},
        "caption_failures": captions["failures"] if captions else None,
        "bias": {},
        "clusters": {},
        "prompt_profiles": {},
    }
    for layer in config.layers:
        saved: dict[str, torch.Tensor] = {}
        for t in tqdm(timesteps, desc=f"directions {layer}", disable=not progress):
            latents = store.load(layer, t, dtype="float32").reshape(len(rows), -1)
            dirs = directions(latents, source.matrix, config.method, source.valid, config.ridge_alpha)
            if config.save_directions:
                saved[f"t={t}"] = torch.from_numpy(np.ascontiguousarray(dirs)).to(
                    torch.float16 if config.dtype == "float16" else torch.float32
                )
            centre = latents[source.valid].mean(0)
            family_dirs = {}
            for b in config.bias:
                columns = [source.terms.index(w) for w in b.family]
                family_dirs[b.family_name] = dirs[columns]
                in_sample = family_profile(cosine_to_directions(latents, family_dirs[b.family_name], centre))
                profile = (
                    cross_fitted_profile(
                        latents, source.matrix, source.valid, columns, halves, config.method, config.ridge_alpha
                    )
                    if halves is not None
                    else in_sample
                )
                for q_result in _bias_step(
                    questions[b.family_name],
                    profile,
                    rows_of,
                    images[b.family_name] if images else None,
                    config,
                    halves,
                    in_sample if halves is not None else None,
                ):
                    results["bias"].setdefault(layer, {}).setdefault(b.family_name, {}).setdefault(
                        q_result["subject"], {}
                    )[str(t)] = q_result
                if layer == config.layers[0] and t == headline_t:
                    results["prompt_profiles"][b.family_name] = {
                        "prompts": texts,
                        "descriptors": b.family,
                        "values": prompt_means(profile, prompt_index, len(texts)).tolist(),
                    }
            if config.cluster_by:
                nuisance = [family_dirs[f] for f in config.cluster_remove]
                results["clusters"].setdefault(layer, {})[str(t)] = _cluster_step(
                    latents, prompt_index, config, np.concatenate(nuisance) if nuisance else None, store.shape(layer)
                )
        if config.save_directions:
            (out / "directions").mkdir(exist_ok=True)
            atomic_write_bytes(
                out / "directions" / f"{safe_name(layer)}.safetensors",
                canonical_safetensors(
                    safetensors_bytes(
                        saved, metadata={"method": config.method, "source": config.text_source, "layer": layer}
                    )
                ),
            )
            atomic_write_json(
                out / "directions" / "terms.json",
                {"terms": source.terms, "source": config.text_source, "method": config.method},
            )
    results["summary"] = summarise(results, config)
    # the file holds what a rerun reproduces byte for byte; how much this particular run sampled is only returned
    atomic_write_json(
        out / "results.json",
        to_json_value({**results, "cost": {k: v for k, v in cost.items() if k != "sampled_this_run"}}),
    )
    return results


def _headline(timesteps: list[int], headline: str | int) -> int:
    if headline == "last":
        return timesteps[-1]
    if int(headline) not in timesteps:
        raise SpecError(f"headline step t={headline} was not sampled; sampled steps: {timesteps}.")
    return int(headline)


def _sample(target: Target, config: DirectionsConfig, out: Path, progress: bool) -> dict[str, Any]:
    """One trajectory per prompt x seed, every layer and step in that pass; counts the denoiser calls."""
    spec = TrajectoryConfig(
        prompts=[p.text for p in config.prompts],
        layers=list(config.layers),
        seeds=list(config.seeds),
        steps=config.steps,
        guidance_scale=config.guidance_scale,
        batch_size=config.batch_size,
        pooling="none",
        dtype=config.dtype,
        shard_size=config.shard_size or config.batch_size,
    )  # progress is committed every batch
    rows_seen = [0]

    def count(module, args, kwargs):
        sample = args[0] if args else next(iter(kwargs.values()))
        rows_seen[0] += int(sample.shape[0])

    handle = target.denoiser.register_forward_pre_hook(count, with_kwargs=True)
    committed_before = _committed_rows(out)
    try:
        manifest = capture_trajectories(target, spec, out, progress=progress)
    finally:
        handle.remove()
    sampled = manifest.rows - committed_before
    steps = len(manifest.timesteps)
    # the first pipeline call samples one prompt to learn the schedule and shapes (stored nowhere)
    halves = target.kind == "text_unet" or (target.family is not None and target.family.cfg_halves())
    guided = 2 if config.guidance_scale > 1 and halves else 1
    probe = (steps + manifest.notes.get("dropped_duplicate_calls", 0)) * guided
    # accumulated over resumed runs, so the figure covers every trajectory in the store
    ledger_path = out.parent / "cost.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {"sampled": 0, "denoiser_rows": 0}
    if sampled:
        ledger = {
            "sampled": ledger["sampled"] + sampled,
            "denoiser_rows": ledger["denoiser_rows"] + rows_seen[0] - probe,
        }
        atomic_write_json(ledger_path, ledger)
    per_step = ledger["denoiser_rows"] / (ledger["sampled"] * steps) if ledger["sampled"] else None
    return {
        "trajectories": len(spec.prompts) * len(spec.seeds),
        "sampled_this_run": sampled,
        "steps": steps,
        "layers": len(config.layers),
        "denoiser_rows": ledger["denoiser_rows"],
        "denoiser_rows_per_trajectory_step": per_step,
        "guided_pair": guided == 2,
    }


def _committed_rows(store_dir: Path) -> int:
    """Rows already sampled in an earlier (possibly interrupted) run."""
    from diffdissect.store.manifest import Manifest

    return Manifest.load(store_dir).rows if (store_dir / "manifest.json").is_file() else 0


def _captions(store, rows: list[dict], captioner: Captioner, path: Path, progress: bool, batch: int = 256) -> dict:
    """Caption every sample once; saved after each batch, so an interrupted run keeps what it captioned."""
    saved = json.loads(path.read_text()) if path.is_file() else {"captioner": captioner.name, "items": {}}
    if saved.get("captioner") != captioner.name:
        raise DataError(
            f"{path} holds captions by {saved.get('captioner')!r}, not {captioner.name!r}; use the same "
            "captioner to resume, or a new output directory."
        )
    items: dict[str, dict] = saved["items"]
    keys = [f"{r['input_id']}/s{r['seed']}" for r in rows]
    todo = [i for i, k in enumerate(keys) if k not in items]
    with tqdm(total=len(todo), desc="captions", unit="image", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch):
            part = todo[start : start + batch]
            images = np.stack([np.asarray(Image.open(store.directory / rows[i]["image"]).convert("RGB")) for i in part])
            result = caption_images(captioner, images)
            for i, text, err in zip(part, result.captions, result.errors):
                items[keys[i]] = {"caption": text, "error": err}
            atomic_write_json(path, saved)
            bar.update(len(part))
    captions = [items[k]["caption"] for k in keys]
    failures = [{"sample": k, "error": items[k]["error"]} for k in keys if items[k]["error"]]
    if all(c is None for c in captions):
        raise DataError(
            f"the captioner failed on every image (first error: {failures[0]['error']}); "
            "check it on one image, or use text_source='prompts'."
        )
    return {"captions": captions, "failures": {"count": len(failures), "examples": failures[:10]}}


def _image_measures(questions, rows_of: dict[str, np.ndarray], captions: dict) -> dict[str, dict[str, Any]]:
    """Per subject, the caption-based answer (the same at every step, so computed once)."""
    out = {}
    for q in questions:
        image = image_rates(captions["captions"], rows_of[q.subject], q.family)
        if q.references:
            refs = np.concatenate([rows_of[q.references[d]] for d in q.family])
            ref_rates = image_rates(captions["captions"], refs, q.family)
            image["reference_rates"] = ref_rates["rates"]
            image["excess"] = [a - b for a, b in zip(image["rates"], ref_rates["rates"])]
        else:
            image["excess"] = [r - 1.0 / len(q.family) for r in image["rates"]]
        image["score"] = max(image["excess"])
        image["top"] = int(np.argmax(image["excess"]))
        out[q.subject] = image
    return out


def _bias_step(
    questions,
    profile: np.ndarray,
    rows_of: dict[str, np.ndarray],
    images: dict[str, dict] | None,
    config: DirectionsConfig,
    halves: np.ndarray | None = None,
    in_sample: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    out = []
    for q in questions:
        refs = [rows_of[q.references[d]] for d in q.family] if q.references else None
        latent = latent_bias(
            profile,
            rows_of[q.subject],
            refs,
            halves=halves,
            resamples=config.resamples,
            permutations=config.permutations,
            seed=config.seed,
        )
        entry = {"subject": q.subject, "family": q.family, "references": q.references, "latent": latent}
        if in_sample is not None:  # the old statistic (directions fitted on the scored samples), for comparison
            old = latent_bias(
                in_sample,
                rows_of[q.subject],
                refs,
                resamples=min(config.resamples, 200),
                permutations=config.permutations,
                seed=config.seed,
            )
            entry["in_sample"] = {k: old[k] for k in ("score", "score_ci", "top", "p_value")}
        if images is not None:
            entry["image"] = images[q.subject]
            entry["agreement"] = rank_agreement(latent["excess"], images[q.subject]["excess"])
        out.append(entry)
    adjusted = holm([e["latent"]["p_value"] for e in out])
    for e, p in zip(out, adjusted):
        e["latent"]["p_holm"] = p
        e["latent"]["significant"] = p < 0.05
    return out


def _cluster_step(
    latents: np.ndarray,
    prompt_index: np.ndarray,
    config: DirectionsConfig,
    nuisance: np.ndarray | None,
    shape: tuple[int, ...] = (),
) -> ClusterStep:
    prompts = config.prompts
    chosen = [i for i, p in enumerate(prompts) if config.cluster_by in p.slots]
    groups = [prompts[i].slots[config.cluster_by] for i in chosen]
    k = len(set(groups))
    if config.cluster_pooling == "mean" and len(shape) > 1:  # position-free: each sample's map pooled first
        latents = spatial_mean(latents, shape)
        nuisance = spatial_mean(nuisance, shape) if nuisance is not None else None
    means = prompt_means(latents, prompt_index, len(prompts))[chosen]
    permutations = min(config.permutations, 1000)

    def fit(clusters: np.ndarray, family: list[str] | None = None) -> ClusterFit:
        score = ari_with_null(groups, clusters, permutations, config.seed)
        return ClusterFit(score.ari, score.p_value, score.null_q95, clusters.tolist(), family)

    raw = fit(cluster_prompts(means, k, config.seed))
    removed = (
        fit(cluster_prompts(project_out(means - means.mean(0), nuisance), k, config.seed), list(config.cluster_remove))
        if nuisance is not None
        else None
    )
    return ClusterStep(k, [prompts[i].text for i in chosen], groups, config.cluster_pooling, raw, removed)


def summarise(results: dict[str, Any], config: DirectionsConfig) -> dict[str, Any]:
    """The headline figures: per family, subjects ranked by latent bias score at the headline cell."""
    layer, t = results["headline"]["layer"], str(results["headline"]["t"])
    out: dict[str, Any] = {"layer": layer, "t": int(t), "families": {}}
    for family, subjects in results["bias"].get(layer, {}).items():
        table = []
        for subject, per_t in subjects.items():
            e = per_t[t]
            lat = e["latent"]
            row = {
                "subject": subject,
                "top": e["family"][lat["top"]],
                "score": lat["score"],
                "ci": lat["score_ci"],
                "p_value": lat["p_value"],
                "p_holm": lat["p_holm"],
                "significant": lat["significant"],
            }
            if "image" in e:
                row.update(
                    image_top=e["family"][e["image"]["top"]],
                    image_score=e["image"]["score"],
                    image_rates=dict(zip(e["family"], e["image"]["rates"])),
                    descriptor_spearman=e["agreement"]["spearman"],
                )
            if "in_sample" in e:
                row["in_sample"] = e["in_sample"]
            row["cross_fitted"] = lat.get("cross_fitted", False)
            row["scores_by_t"] = {tt: v["latent"]["score"] for tt, v in per_t.items()}
            table.append(row)
        table.sort(key=lambda r: -r["score"])
        entry = {"subjects": table}
        if all("image_score" in r for r in table) and len(table) > 1:
            entry["subject_agreement"] = rank_agreement([r["score"] for r in table], [r["image_score"] for r in table])
        out["families"][family] = entry
    if results["clusters"]:
        per_t = results["clusters"][layer]
        out["clusters"] = {
            kind: {
                "at_headline": fit.ari,
                "mean_over_steps": float(np.mean([v.fits()[kind].ari for v in per_t.values()])),
            }
            for kind, fit in per_t[t].fits().items()
        }
    return out


def __getattr__(name: str) -> object:  # the names before "one word for configs" (deprecated)
    from diffdissect.runtime import deprecated_alias

    return deprecated_alias(__name__, name, {"BiasSpec": BiasConfig})
