"""The FeatInv report section, from `evaluate_world` results (plain data plus a few image grids)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffdissect.report import Report, Section, image_grid


def _pct(entry: dict[str, Any] | None) -> str:
    if not entry:
        return ""
    return f"{entry['rate']:.3f} [{entry['ci95'][0]:.2f}, {entry['ci95'][1]:.2f}]"


def metrics_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, m in results["reconstruction"].items():
        f = m.get("factors", {})
        fd = m.get("frechet", {})
        rows.append(
            [
                name,
                f"{m['feature_cosine_pooled']:.3f}",
                f"{m['feature_cosine_per_location']:.3f}",
                _pct(m["classifier_top1"]),
                _pct(m["classifier_top5"]),
                _pct(m.get("judge_top1")),
                _pct(m.get("judge_top5")),
                *[_pct(f.get(k)) for k in ("shape", "colour", "size", "xpos", "ypos")],
                (
                    f"{fd['originals_vs_reconstructions']:.1f}"
                    + (f" ({fd['originals_vs_independent_real']:.1f})" if "originals_vs_independent_real" in fd else "")
                )
                if fd
                else "",
                _pct(m.get("inputs_whose_seeds_disagree")),
            ]
        )
    return rows


METRIC_HEADER = [
    "inverter",
    "feature cos (pooled)",
    "feature cos (per location)",
    "classifier top-1",
    "classifier top-5",
    "judge top-1",
    "judge top-5",
    "shape",
    "colour",
    "size",
    "xpos",
    "ypos",
    "Frechet (real vs real)",
    "inputs whose seeds disagree",
]


def invert_section(report: Report, results: dict[str, Any]) -> Section:
    s = report.section("Feature inversion (FeatInv)")
    s.paragraph(
        f"A ControlNet copied from the frozen toy UNet, with FeatInv's hint block, maps a classifier's feature "
        f"map back to an image. {results['n']} held-out balanced-world images; {len(results['seeds'])} seeds per "
        f"input, guidance {results['guidance']} on the features (vs the all-zero map), {results['steps']} "
        "sampler steps. Agreement is the attribute captioner's (an independent network's) reading of the "
        "reconstruction vs the original, with Wilson 95% CIs; 'spatial' conditions on the map, 'pooled' on its "
        "mean vector broadcast over the grid (the baseline)."
    )
    if results.get("missing"):
        s.note(f"Not trained (no weights): {', '.join(results['missing'])}; run `diffdissect invert build-world`.")
    s.table(METRIC_HEADER, metrics_rows(results), "reconstruction metrics (seed 0)")
    grids = results["grids"]
    names = [k for k in grids if k != "originals"]
    if names:
        rows = np.concatenate([grids["originals"], *[grids[k][:, 0] for k in names]])
        s.image(
            image_grid(rows, columns=len(grids["originals"]), scale=3),
            "rows: original | " + " | ".join(names) + " (seed 0)",
        )
        first = names[0]
        seeds = grids[first].shape[1]
        s.image(
            image_grid(
                grids[first][:, :].transpose(1, 0, 2, 3, 4).reshape(-1, *grids[first].shape[2:]),
                columns=len(grids[first]),
                scale=3,
            ),
            f"{first}: one row per seed: what the features leave open varies across seeds ({seeds} seeds)",
        )
    for name in ("steering", "composites"):
        if (results.get(name) or {}).get("skipped"):
            s.note(f"{name}: {results[name]['skipped']}")
    steering = results.get("steering")
    if steering and not steering.get("skipped"):
        rows = [
            [a, _pct(v["flipped"]), _pct(v["others_kept"]), _pct(v["flipped_and_kept"])]
            for a, v in steering["alphas"].items()
        ]
        s.table(
            ["alpha", f"{steering['factor']} flipped to {steering['to']}", "other factors kept", "both"],
            rows,
            f"concept steering ({steering['from']} -> {steering['to']}: the mean feature difference added at every "
            f"location), {steering['n']} {steering['from']} images",
        )
        grid = np.concatenate([steering["originals"], *[steering["grids"][a] for a in steering["grids"]]])
        s.image(
            image_grid(grid, columns=len(steering["originals"]), scale=3),
            "rows: original, then alpha = " + ", ".join(steering["grids"]),
        )
    composites = results.get("composites")
    if composites and not composites.get("skipped"):
        s.table(
            ["check", "rate"],
            [
                ["left half shows the left source's colour", _pct(composites["left_region_matches_left_source"])],
                ["right half shows the right source's colour", _pct(composites["right_region_matches_right_source"])],
                ["both", _pct(composites["both_regions"])],
            ],
            f"composites: left half of one feature map + right half of another ({composites['pairs']} pairs)",
        )
        g = composites["grids"]
        s.image(
            image_grid(
                np.concatenate([g["left_sources"], g["right_sources"], g["composites"]]),
                columns=len(g["composites"]),
                scale=3,
            ),
            "rows: left source, right source, composite inversion",
        )
    robustness = results.get("robustness")
    if robustness:
        rows = [
            [
                name,
                _pct(v["classifier_accuracy_on_input"]),
                _pct(v["reconstruction_shows_prediction"]),
                _pct(v["reconstruction_shows_truth"]),
            ]
            for name, v in robustness["cases"].items()
        ]
        s.table(
            [
                "input",
                "classifier accuracy",
                "reconstruction shows the classifier's prediction",
                "reconstruction shows the truth",
            ],
            rows,
            f"what the classifier sees under corruption and attack ({robustness['n']} images; classes = colour x shape)",
        )
        for name, (inputs, recs) in robustness["grids"].items():
            s.image(
                image_grid(np.concatenate([inputs, recs]), columns=len(inputs), scale=2),
                f"{name}: input (top) and the inversion of its features (bottom)",
            )
    return s


def write_reconstructions(out: str | Path, originals: np.ndarray, recs: np.ndarray, seeds: Sequence[int]) -> Path:
    """`invert sample`'s files: one PNG per (input, seed), and grid.png (originals, then one row per seed)."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, per_seed in enumerate(recs):
        for s, image in zip(seeds, per_seed):
            Image.fromarray(image).save(out / f"input{i:05d}-seed{s}.png")
    rows = [originals[:8]] + [recs[:8, k] for k in range(len(seeds))]
    (out / "grid.png").write_bytes(image_grid(np.concatenate(rows), columns=min(8, len(originals)), scale=3))
    return out
