"""SAE outputs: features.json + browser.html for one SAE, and the demo report's SAE section."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from diffdissect.atomic import atomic_write_bytes
from diffdissect.report import Report, Section, heatmap, image_grid
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
    except Exception:   # a moved folder or an uncached dataset: no thumbnails, the tables still stand
        return None
    return None


def write_feature_outputs(sae_dir: str | Path, *, store: str | Path | None = None, labels=None, top_n: int = 16,
                          images: str | None = None, image_source=None, out: str | Path | None = None,
                          device: str = "cpu") -> dict[str, Path]:
    results, acts, held = analyse_features(sae_dir, store=store, label_columns=labels,
                                           config=FeaturesConfig(top_n=top_n, device=device))
    out = Path(out or sae_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = image_source if image_source is not None else image_source_for(store or results["slice"]["store"], images)
    paths = {"json": out / "features.json", "browser": out / "browser.html"}
    atomic_write_bytes(paths["json"], json.dumps(results, indent=1).encode())
    write_browser(paths["browser"], browser_data(results, acts, held, source))
    return paths


def sae_section(report: Report, summaries: list[dict[str, Any]], features: list[dict[str, Any]],
                browser_links: list[str], example_images: list[tuple[str, np.ndarray]]) -> Section:
    s = report.section("Sparse autoencoders (TopK)")
    s.paragraph("TopK SAEs trained per (layer, t) on per-location tokens of the demo capture; metrics on held-out "
                "images (split by image). FVU is centred; a latent is dead when it has not fired for one epoch of "
                "training tokens. AUROC: each latent's per-image activation (max over locations) as a score for "
                "each factor value.")
    rows = []
    for summary, feats in zip(summaries, features):
        m = summary["metrics"]
        rows.append([summary["slice"]["layer"], summary["slice"]["t"], summary["sae"]["n_latents"], summary["sae"]["k"],
                     f"{m['fvu']:.3f}", f"{m['l0']:.1f}", f"{100 * m['dead_fraction']:.1f}%",
                     f"{feats['values_with_auroc_ge_0.95']} / {feats['values_total']}"])
    s.table(["layer", "t", "latents", "k", "held-out FVU", "L0", "dead", "factor values with a latent of AUROC >= 0.95"],
            rows, "one SAE per slice")
    layers = sorted({r["slice"]["layer"] for r in summaries})
    ts = sorted({r["slice"]["t"] for r in summaries})
    fvu = np.full((len(layers), len(ts)), np.nan)
    for r in summaries:
        fvu[layers.index(r["slice"]["layer"]), ts.index(r["slice"]["t"])] = r["metrics"]["fvu"]
    s.image(heatmap(fvu, layers, [f"t={t}" for t in ts], "held-out FVU", vmin=0, vmax=0.5, cmap="viridis_r"),
            "held-out fraction of variance unexplained per (layer, t)")
    for feats in features[:1]:
        rows = [[factor, value, best["latent"], f"{best['auroc']:.3f}"]
                for factor, table in feats["best_latent_per_value"].items() for value, best in table.items()]
        s.table(["factor", "value", "best latent", "AUROC"], rows,
                f"best latent per factor value ({feats['slice']['layer']} @ t={feats['slice']['t']})")
    for caption, grid in example_images:
        s.image(image_grid(grid, columns=8, scale=2), caption)
    for link in browser_links:
        s.paragraph(f"Feature browser (opens from disk): {link}")
    return s
