"""`diffdissect demo`: the main job on the embedded default (the shapes world), no arguments, no network.

It loads the committed toy pipeline and captures held-out world images (every layer and timestep in
one pass per image and t), then runs every analysis on that one capture, each checked against the
world's planted truth: probes per (layer, t) with shuffled-label and random-init controls, TopK
SAEs with their feature browsers, and prompt-driven h-space directions (Decoding Diffusion) that
measure what each shape's prompt defaults to, and feature inversion (FeatInv) of the CNN's and the
ViT's feature maps with the committed inverters. It writes `report.html` and `results.json`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffdissect.data.transforms import unit_to_uint8
from diffdissect.directions import directions_section, run_directions
from diffdissect.invert.report import invert_section
from diffdissect.probe import ProbeConfig, probe_section, run_probes, summary_rows, write_probe_outputs
from diffdissect.report import Report, image_grid
from diffdissect.sae import TrainConfig, train_sae
from diffdissect.sae.report import sae_section, write_feature_outputs
from diffdissect.store import open_store, verify_store
from diffdissect.world.directions import check_against_world, world_directions_config
from diffdissect.world.generator import FACTORS, WorldConfig
from diffdissect.world.invert import evaluate_world, strip_images
from diffdissect.world.shapes import HELD_OUT_SEED, ShapesWorld

DEMO_LAYERS = ["down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
DEMO_TIMESTEPS = [25, 200, 500, 800]
DEMO_PROMPTS = [
    "a red circle",
    "a large blue square at the top left",
    "a small yellow triangle at the bottom right",
    "a green cross",
    "a square",
    "a triangle",
    "a circle",
    "a cross",
]
__all__ = ["DemoConfig", "HELD_OUT_SEED", "run_demo"]


@dataclass
class DemoConfig:
    images: int = 1024
    """held-out world images to capture"""
    sae_layers: list[str] = field(default_factory=lambda: ["mid_block", "up_blocks.0"])
    """layers of the per-location SAEs"""
    sae_timesteps: list[int] = field(default_factory=lambda: [25, 200])
    """timesteps of the per-location SAEs"""
    sae_k: int = 16
    """active latents per token"""
    sae_expansion: int = 8
    """n_latents = expansion x the layer's width"""
    sae_epochs: float = 30.0
    """SAE training epochs"""
    sae_batch: int = 1024
    """SAE tokens per step"""
    direction_seeds: int = 128
    """seeds per prompt of the Decoding-Diffusion section (0: skip it)"""
    inversion_images: int = 48
    """held-out images inverted by the committed inverters (0: skip the feature-inversion section)"""
    inversion_steps: int = 10
    """sampler steps per reconstruction (the eval command uses 20)"""


def run_demo(
    out: Path, *, shapes_world: ShapesWorld | None = None, config: DemoConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """The demo on a shapes world (default: the committed one), written into `out`."""
    config = config or DemoConfig()
    start = time.perf_counter()
    shapes_world = shapes_world or ShapesWorld.load()
    world = shapes_world.config
    out.mkdir(parents=True, exist_ok=True)
    target = shapes_world.target()
    print(
        f"shapes world: pipeline {shapes_world.pipeline_dir} ({sum(p.numel() for p in target.denoiser.parameters()):,} UNet parameters)"
    )
    source, batch = shapes_world.source(config.images)

    shapes_world.capture(
        out / "store",
        config.images,
        DEMO_LAYERS,
        DEMO_TIMESTEPS,
        pooling="none",
        target=target,
        source=source,
        progress=progress,
    )
    shapes_world.capture(
        out / "store_random_init",
        config.images,
        DEMO_LAYERS,
        DEMO_TIMESTEPS,
        pooling="mean",
        random_init=True,
        source=source,
        progress=progress,
    )
    verified = verify_store(out / "store").ok
    reader = open_store(out / "store")
    print(
        f"captured {reader.num_rows} held-out images x {len(DEMO_LAYERS)} layers x {len(DEMO_TIMESTEPS)} timesteps "
        f"(and a random-init control); store verified: {'OK' if verified else 'FAILED'}"
    )

    probes = run_probes(
        str(out / "store"),
        ProbeConfig(labels=list(FACTORS), shuffled_control=True, random_init_store=str(out / "store_random_init")),
        progress=False,
    )
    write_probe_outputs(probes, out / "probes")
    nan = float("nan")
    for row in summary_rows(probes):
        random_init, shuffled = row.control("random_init"), row.control("shuffled")
        print(
            f"probe {row.label}: cell chosen on validation {row.best_layer} @ t={row.best_t}, test "
            f"{row.best_accuracy:.3f} (random-init {random_init.best_accuracy if random_init else nan:.3f}, "
            f"shuffled mean {shuffled.mean_accuracy if shuffled else nan:.3f}; max over cells of test accuracy, "
            f"biased: {row.test_max_accuracy:.3f}, random-init "
            f"{random_init.test_max_accuracy if random_init else nan:.3f})"
        )

    summaries, features, links, examples = [], [], [], []
    for layer in config.sae_layers:
        for t in config.sae_timesteps:
            train = TrainConfig(
                layer=layer,
                t=t,
                tokens=True,
                k=config.sae_k,
                expansion=config.sae_expansion,
                epochs=config.sae_epochs,
                batch_size=config.sae_batch,
            )
            run_dir = out / "sae" / train.run_name()
            if (run_dir / "config.json").is_file():
                shutil.rmtree(run_dir)  # the demo's own earlier run (maybe other weights)
            summary = train_sae(out / "store", train, run_dir, progress=progress)
            paths = write_feature_outputs(run_dir, image_source=source, labels=list(FACTORS), masks=batch.masks)
            feats = json.loads(paths["json"].read_text())
            summaries.append(summary)
            features.append(feats)
            links.append(str(paths["browser"].relative_to(out)))
            m = summary["metrics"]
            named = feats.get("caption_labels", {})
            print(
                f"SAE {layer} @ t={t}: held-out FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}, dead {100 * m['dead_fraction']:.1f}%, "
                f"factor values with AUROC >= 0.95: {feats['heldout']['heldout']}/{feats['values_total']} chosen on "
                f"half A, scored on half B (per location {feats.get('per_location', {}).get('heldout', '-')}; max over "
                f"latents, biased: {feats['values_with_auroc_ge_0.95']}); caption label names the value for "
                f"{named.get('top_word_names_it', '-')}/{named.get('values_total', '-')}"
            )
    examples = _best_feature_examples(features[0], source) if features else []

    directions = _directions(out, target, shapes_world, config, progress) if config.direction_seeds else None

    inversion = None
    if config.inversion_images:
        inversion = evaluate_world(
            target, shapes_world, n=config.inversion_images, seeds=(0,), steps=config.inversion_steps
        )
        for name, m in inversion["reconstruction"].items():
            f = m["factors"]
            print(
                f"inversion {name}: feature cos {m['feature_cosine_pooled']:.3f}; judge agreement shape "
                f"{f['shape']['rate']:.2f} colour {f['colour']['rate']:.2f} position "
                f"{min(f['xpos']['rate'], f['ypos']['rate']):.2f}"
            )

    samples = _generate(target.pipeline, DEMO_PROMPTS, per_prompt=8)
    results: dict[str, Any] = {
        "config": asdict(config),
        "world": {"config": world.to_json(), "planted_colour_given_shape": world.planted_rates()},
        "pipeline": {
            "path": str(shapes_world.pipeline_dir),
            "build": json.loads((shapes_world.directory / "build.json").read_text()),
            "eval": _load_json(shapes_world.directory / "eval.json"),
        },
        "capture": {
            "store": str(out / "store"),
            "rows": reader.num_rows,
            "verified": verified,
            "layers": reader.manifest.layers,
            "timesteps": reader.manifest.timesteps,
        },
        "probes": {k: v for k, v in probes.to_json().items() if k != "split_by_image"}
        | {"summary": [row.to_json() for row in summary_rows(probes)]},
        "sae": [
            {
                "summary": s,
                "features": {
                    k: f[k]
                    for k in (
                        "best_latent_per_value",
                        "values_with_auroc_ge_0.95",
                        "values_total",
                        "baselines",
                        "attribution",
                        "heldout",
                        "per_location",
                        "caption_labels",
                        "words",
                    )
                    if k in f
                },
            }
            for s, f in zip(summaries, features)
        ],
        "selection": SELECTION,
        "samples": {"prompts": DEMO_PROMPTS, "per_prompt": 8},
        "directions": {"summary": directions[0]["summary"], "cost": directions[0]["cost"], "world_check": directions[1]}
        if directions
        else None,
        "inversion": strip_images(inversion) if inversion else None,
    }
    report = Report("diffdissect demo: the shapes world")
    _selection_section(report)
    _world_section(report, world, batch)
    _pipeline_section(report, results["pipeline"], samples)
    _capture_section(report, results["capture"])
    probe_section(report, probes)
    if summaries:
        sae_section(report, summaries, features, links, examples)
    if directions:
        directions_section(report, directions[0], out / "directions", directions[1])
    if inversion:
        invert_section(report, inversion)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable))
    path = report.write(out / "report.html")
    print(f"report: {path}\nresults: {out / 'results.json'}\n({time.perf_counter() - start:.0f} s)")
    return results


def _directions(out: Path, target, shapes_world: ShapesWorld, config: DemoConfig, progress: bool):
    """Decoding Diffusion on the world: what 'a {shape}' defaults to, checked against the planted rates."""
    run_dir = out / "directions"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo's own earlier run (maybe other weights)
    world = shapes_world.config
    settings = world_directions_config(world, seeds=config.direction_seeds, permutations=500, resamples=500)
    results = run_directions(target, settings, run_dir, shapes_world.captioner(), progress=progress)
    check = check_against_world(results, world)
    for r in results["summary"]["families"]["colour"]["subjects"]:
        print(
            f"default of {r['subject']!r}: latent {r['top']} {r['score']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] "
            f"p(Holm) {r['p_holm']:.4f}; images {r['image_top']} {r['image_rates'][r['image_top']]:.2f}"
        )
        if "in_sample" in r:
            print(f"  in-sample (old) score {r['in_sample']['score']:.3f}, p {r['in_sample']['p_value']:.4f}")
    held_out = " and ".join(settings.cluster_remove)
    print(
        f"planted order {' > '.join(check['order'])}: {'recovered' if check['latent_order_correct'] else 'NOT recovered'}"
        f"; prompt clusters by shape ({held_out} held out, maps {settings.cluster_pooling}-pooled): ARI "
        f"{check['cluster_ari'].get('removed', {}).get('at_headline', float('nan')):.2f} (raw "
        f"{check['cluster_ari'].get('raw', {}).get('at_headline', float('nan')):.2f})"
    )
    return results, check


def _best_feature_examples(features: dict[str, Any], source) -> list[tuple[str, np.ndarray]]:
    """Top images of the best latent for a few factor values (shape and colour)."""
    out = []
    for factor in ("shape", "colour"):
        for value, best in list(features["heldout"]["best_latent_per_value"].get(factor, {}).items())[:2]:
            latent = features["latents"][best["latent"]]
            images = [np.asarray(source.load(features["heldout_source_index"][p]).image) for p in latent["top"][:8]]
            if images:
                out.append(
                    (
                        f"latent {best['latent']}: chosen for {factor}={value} on half A (AUROC on half B "
                        f"{best['auroc']:.3f}); its top held-out images",
                        np.stack(images),
                    )
                )
    return out


def _generate(pipe: Any, prompts: list[str], per_prompt: int) -> np.ndarray:
    import torch

    pipe.set_progress_bar_config(disable=True)
    every = [p for p in prompts for _ in range(per_prompt)]
    gens = [torch.Generator().manual_seed(i) for i in range(len(every))]
    images = pipe(prompt=every, num_inference_steps=20, guidance_scale=4.0, generator=gens, output_type="np").images
    return unit_to_uint8(images)


SELECTION = {
    "probes": "per label, the (layer, t) cell with the highest validation accuracy; its test accuracy and bootstrap "
    "CI are the headline (each control's cell is chosen the same way on its own validation accuracy); the "
    "max over cells of test accuracy is shown beside it, biased upwards",
    "sae": "per factor value, the latent with the highest AUROC on half A of the held-out images, reported by its "
    "AUROC on half B (p from permuting half B's labels); the max over latents on all held-out images is "
    "shown beside its permutation null, biased upwards; the SAE slices themselves are fixed in advance",
    "directions": "the headline cell is fixed in advance (mid_block at the last sampler step); bias scores are "
    "cross-fitted over seed halves, the null permutes membership within halves, Holm across subjects",
    "clustering": "fixed in advance: k = the number of shapes, colour and size directions projected out, each "
    "sample's map mean-pooled over positions; ARI against the shape grouping with a permutation null",
}


def _selection_section(report: Report) -> None:
    s = report.section("How each headline was selected")
    s.paragraph(
        "A figure picked as the best of many on the same data overstates what a new sample would show. "
        "Each headline below was chosen on one split (or fixed in advance) and measured on another."
    )
    s.table(["analysis", "selection"], [[k, v] for k, v in SELECTION.items()])


def _world_section(report: Report, world: WorldConfig, batch) -> None:
    s = report.section("The shapes world")
    s.paragraph(
        "Procedural 32x32 images of one shape, with known factors (shape, colour, size, horizontal and "
        "vertical position) and planted colour defaults per shape. Captions leave factors out at random; "
        "captions without a colour still follow the skewed P(colour | shape)."
    )
    s.image(image_grid(batch.images[:32], columns=8, scale=3), "held-out world images (the demo's capture inputs)")
    s.table(["#", "caption"], [[i, c] for i, c in enumerate(batch.captions[:8])], "their captions (first 8)")
    colours = list(world.colours)
    s.table(
        ["shape", "planted bias", *colours],
        [
            [shape, world.bias_strength.get(shape, ""), *[world.colour_given_shape[shape][c] for c in colours]]
            for shape in world.shapes
        ],
        "planted P(colour | shape)",
    )


def _pipeline_section(report: Report, info: dict[str, Any], samples: np.ndarray) -> None:
    s = report.section("The toy text-to-image pipeline")
    s.paragraph(
        "A miniature Stable Diffusion in stock diffusers format (AutoencoderKL, UNet2DConditionModel with "
        "cross-attention, CLIP text encoder and tokenizer), trained on the world by `diffdissect toy build`."
    )
    s.image(
        image_grid(samples, columns=8, scale=3),
        "8 samples per prompt (20 steps, guidance 4), one row per prompt: " + "; ".join(DEMO_PROMPTS),
    )
    build = info["build"]
    s.table(["part", "training time (s)"], sorted(build.get("timings_s", {}).items()), "build timings")
    evaluation = info.get("eval")
    if evaluation:
        rows = [
            [f, v["rate"], f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"]
            for f, v in evaluation["full_prompts"]["per_factor"].items()
        ]
        s.table(
            ["factor", "match rate", "95% CI"], rows, "prompts naming every factor: the captioner's reading matches"
        )
        rows = [
            [shape, v["bias"], v["max_abs_error"], v["shape_match"]]
            for shape, v in evaluation["colour_defaults"]["per_shape"].items()
        ]
        s.table(
            ["shape", "planted bias", "max |generated - planted| colour rate", "shape match"],
            rows,
            "prompts that omit the colour: learned defaults vs planted",
        )
    else:
        s.note("No eval.json beside the weights: run `diffdissect toy eval --save` for the quality figures.")


def _capture_section(report: Report, info: dict[str, Any]) -> None:
    s = report.section("Capture: layers x timesteps")
    s.paragraph(
        f"{info['rows']} held-out images captured in one forward pass per (image, t) for all layers, spatial "
        f"maps kept, into {info['store']} (verified: {info['verified']}); a second capture of the same images "
        "from a randomly initialised UNet is the control. t is the training-schedule index (larger = noisier)."
    )
    s.table(["t", "alpha_bar", "noise std"], [[e["t"], e["alpha_bar"], e["noise_std"]] for e in info["timesteps"]])
    s.table(
        ["layer", "stored shape per image"], [[l, "x".join(map(str, m["shape"]))] for l, m in info["layers"].items()]
    )


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
