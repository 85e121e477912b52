"""SAE outputs: features.json + browser.html for one SAE, and the demo report's SAE section."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diffdissect.atomic import atomic_write_bytes
from diffdissect.report import Report, Section, heatmap, image_grid
from diffdissect.sae.attribution import AttributionConfig
from diffdissect.sae.browser import browser_data, write_browser
from diffdissect.sae.features import FeaturesConfig, analyse_features
from diffdissect.store import open_store


def image_source_for(store: str | Path, images: str | None = None):
    """The capture's images, to show thumbnails: `images` (a folder) or the folder/dataset the manifest names."""
    from diffdissect.data import FolderSource, HFDatasetSource

    if images:
        return FolderSource(images)
    manifest = open_store(store).manifest
    # where the inputs were read from (format 2: manifest.locations; format 1 kept it in the spec)
    source = {**manifest.spec.get("source", {}), **manifest.locations.get("source", {})}
    try:
        if source.get("type") == "folder" and Path(source["path"]).is_dir():
            return FolderSource(source["path"], source.get("csv"))
        if source.get("type") == "hf_dataset":
            return HFDatasetSource(source["name"], split=source.get("split"))
    except Exception:  # a moved folder or an uncached dataset: no thumbnails, the tables still stand
        return None
    return None


def write_feature_outputs(
    sae_dir: str | Path,
    *,
    store: str | Path | None = None,
    labels=None,
    top_n: int = 16,
    images: str | None = None,
    image_source=None,
    out: str | Path | None = None,
    device: str = "cpu",
    masks: np.ndarray | None = None,
    caption_fn=None,
    attribution: AttributionConfig | None = None,
    causal: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """features.json and browser.html. `causal(results)` (from intervene, which sits above sae) adds the
    causal columns: {"config": ..., "latents": {latent: {"up": ..., "ablate": ...}}}."""
    results, acts, held = analyse_features(
        sae_dir,
        store=store,
        label_columns=labels,
        config=FeaturesConfig(top_n=top_n, device=device),
        masks=masks,
        attribution=attribution,
        caption_fn=caption_fn,
    )
    if causal is not None:
        results["causal"] = causal(results)
    out = Path(out or sae_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = image_source if image_source is not None else image_source_for(store or results["slice"]["store"], images)
    paths = {"json": out / "features.json", "browser": out / "browser.html"}
    atomic_write_bytes(paths["json"], json.dumps(results, indent=1).encode())
    write_browser(paths["browser"], browser_data(results, acts, held, source))
    return paths


def feature_summary_lines(results: dict[str, Any], *, max_latents: int = 10) -> list[str]:
    """Plain-text headline of features.json: the held-out coverage (and the old max beside it) and the caption
    words of the most frequent labelled latents, with their enrichment and BH q-values."""
    lines = []
    heldout = results.get("heldout")
    if heldout and heldout["values_total"]:
        target = results["attribution"]["auroc_target"]
        line = (
            f"factor values with a latent of AUROC >= {target}: {heldout['heldout']} of {heldout['values_total']} "
            f"(chosen on half A of the held-out images, scored on half B)"
        )
        places = results.get("per_location", {})
        if "heldout" in places:
            line += f"; per location: {places['heldout']} of {places['values_total']}"
        lines.append(
            line + f"; max over latents on all held-out images (biased upwards): "
            f"{results['values_with_auroc_ge_0.95']} of {results['values_total']}"
        )
    labelled = sorted((l for l in results["latents"] if l.get("words")), key=lambda l: -l["image_frequency"])
    if "words" in results:
        lines.append(
            f"caption words: {len(labelled)} of {len(results['latents'])} latents have words enriched among "
            f"their top {results['words'].get('top_n', '?')} images (BH q < {results['words'].get('fdr', '?')} "
            f"over {results['words']['tests']} tests)"
        )
    for l in labelled[:max_latents]:
        words = ", ".join(f"{w['word']} (x{w['enrichment']:.1f}, q {w['q']:.2g})" for w in l["words"])
        lines.append(f"  latent {l['latent']}: {words}")
    return lines


def sae_section(
    report: Report,
    summaries: list[dict[str, Any]],
    features: list[dict[str, Any]],
    browser_links: list[str],
    example_images: list[tuple[str, np.ndarray]],
) -> Section:
    s = report.section("Sparse autoencoders (TopK)")
    s.paragraph(
        "TopK SAEs trained per (layer, t) on per-location tokens of the demo capture; metrics on held-out "
        "images (split by image). FVU is centred; a latent is dead when it has not fired for one epoch of "
        "training tokens. AUROC: each latent's per-image activation (max over locations) as a score for "
        "each factor value. How the headline is selected: the best latent per factor value is chosen on "
        "half A of the held-out images and its AUROC reported on half B (p from permuting half B's labels). "
        "The max over all latents on all held-out images (the old figure) is biased upwards; it is shown "
        "beside its permutation null (labels shuffled across images, every latent rescored). Per location: a "
        "location is positive when it lies inside the object (the world's mask at the layer's grid) of an "
        "image with that value; the same A/B selection applies. Caption words: hypergeometric enrichment "
        "among each latent's top images, Benjamini-Hochberg q over every (latent, word)."
    )
    rows = []
    for summary, feats in zip(summaries, features):
        m = summary["metrics"]
        held = feats.get("heldout", {})
        places = feats.get("per_location", {})
        rows.append(
            [
                summary["slice"]["layer"],
                summary["slice"]["t"],
                summary["sae"]["n_latents"],
                summary["sae"]["k"],
                f"{m['fvu']:.3f}",
                f"{m['l0']:.1f}",
                f"{100 * m['dead_fraction']:.1f}%",
                f"{held.get('heldout', '-')} / {feats['values_total']}",
                f"{places.get('heldout', '-')} / {places.get('values_total', feats['values_total'])}",
                f"{feats['values_with_auroc_ge_0.95']} / {feats['values_total']}",
            ]
        )
    s.table(
        [
            "layer",
            "t",
            "latents",
            "k",
            "held-out FVU",
            "L0",
            "dead",
            "values with AUROC >= 0.95, chosen on A, scored on B",
            "same, per location",
            "max over latents on all images (old figure, biased upwards)",
        ],
        rows,
        "one SAE per slice",
    )
    layers = sorted({r["slice"]["layer"] for r in summaries})
    ts = sorted({r["slice"]["t"] for r in summaries})
    fvu = np.full((len(layers), len(ts)), np.nan)
    for r in summaries:
        fvu[layers.index(r["slice"]["layer"]), ts.index(r["slice"]["t"])] = r["metrics"]["fvu"]
    s.image(
        heatmap(fvu, layers, [f"t={t}" for t in ts], "held-out FVU", vmin=0, vmax=0.5, cmap="viridis_r"),
        "held-out fraction of variance unexplained per (layer, t)",
    )
    for feats in features[:1]:
        held = feats.get("heldout", {}).get("best_latent_per_value", {})
        places = feats.get("per_location", {}).get("best_latent_per_value", {})
        labels = feats.get("caption_labels", {}).get("values", {})
        latents = feats["latents"]
        rows = []
        for factor, table in feats["best_latent_per_value"].items():
            for value, best in table.items():
                h = held.get(factor, {}).get(value)
                pl = places.get(factor, {}).get(value)
                named = labels.get(f"{factor}={value}")
                rows.append(
                    [
                        factor,
                        value,
                        f"{h['latent']}: {h['auroc']:.3f} (p {h['p_value']:.3f})" if h else "-",
                        f"{pl['latent']}: {pl['auroc']:.3f}, IoU {latents[pl['latent']].get('iou', float('nan')):.2f}"
                        if pl
                        else "-",
                        f"{best['latent']}: {best['auroc']:.3f}",
                        f"{h['max_over_latents']['null_q95']:.3f}" if h else "-",
                        ", ".join(named["label"]) if named else "-",
                    ]
                )
        s.table(
            [
                "factor",
                "value",
                "chosen on A: latent, AUROC on B",
                "per location: latent, AUROC on B, IoU",
                "max over latents (biased)",
                "null 95% of the max",
                "caption label of the A-chosen latent",
            ],
            rows,
            f"best latent per factor value ({feats['slice']['layer']} @ t={feats['slice']['t']})",
        )
    for caption, grid in example_images:
        s.image(image_grid(grid, columns=8, scale=2), caption)
    for link in browser_links:
        s.paragraph(f"Feature browser (opens from disk): {link}")
    return s
