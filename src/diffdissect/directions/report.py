"""The Decoding-Diffusion report section, built from `results.json` (plain data) and the sampled images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffdissect.directions.cluster import ClusterStep
from diffdissect.report import Report, Section, bar_chart, heatmap, image_grid


def directions_section(
    report: Report,
    results: dict[str, Any],
    run_dir: str | Path,
    world_check: dict[str, Any] | None = None,
    grid_samples: int = 16,
) -> Section:
    cfg, summary = results["config"], results["summary"]
    layer, t = summary["layer"], summary["t"]
    s = report.section("Prompt-driven directions and defaults (Decoding Diffusion)")
    cost = results["cost"]
    s.paragraph(
        f"{len(cfg['prompts'])} prompts x {len(cfg['seeds'])} seeds = {results['samples']} trajectories, "
        f"{cost['steps']} sampler steps, guidance {cfg['guidance_scale']}; {len(cfg['layers'])} layer(s) captured "
        f"at every step in the same pass ({cost['denoiser_rows_per_trajectory_step'] or 0:.3f} denoiser rows per "
        f"trajectory and step). Captioner: {results['captioner'] or 'none'}. Directions: {cfg['method']} on "
        f"{cfg['text_source']} terms. Headline cell: {layer} at t={t}, "
        f"{results['headline'].get('selected', 'fixed in advance')}. Bias scores are "
        + (
            "cross-fitted: each seed half is scored on directions estimated on the other half, and the null "
            "permutes subject/reference membership within halves; the in-sample score (directions fitted on the "
            "scored samples, the old figure) is shown beside it."
            if cfg.get("cross_fit")
            else "in-sample: the directions were estimated on the samples they score (cross_fit off)."
        )
    )
    failures = results.get("caption_failures")
    if failures and failures["count"]:
        s.note(
            f"The captioner failed on {failures['count']} image(s); they are left out of the caption-based "
            f"measures (first: {failures['examples'][0]['error']})."
        )
    for family, entry in summary["families"].items():
        rows = []
        for r in entry["subjects"]:
            rows.append(
                [
                    r["subject"],
                    r["top"],
                    f"{r['score']:.3f}",
                    f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
                    f"{r['p_holm']:.4f}",
                    "yes" if r["significant"] else "no",
                    r.get("image_top", ""),
                    f"{r['image_score']:.3f}" if "image_score" in r else "",
                    f"{r['in_sample']['score']:.3f} (p {r['in_sample']['p_value']:.4f})" if "in_sample" in r else "-",
                ]
            )
        s.table(
            [
                "subject",
                "latent top",
                "latent bias score",
                "95% CI (seeds)",
                "p (Holm)",
                "significant",
                "image top",
                "image excess rate",
                "in-sample score (old, uncorrected p)",
            ],
            rows,
            f"{family}: excess alignment of the subject's latent with its top descriptor over balanced references, "
            "and the caption rates of its images",
        )
        if "subject_agreement" in entry:
            a = entry["subject_agreement"]
            s.paragraph(
                f"Latent vs image measure across subjects: Spearman {a['spearman']:.2f}, same order: "
                f"{'yes' if a['same_order'] else 'no'}."
            )
        per_subject = results["bias"][layer][family]
        subjects = [r["subject"] for r in entry["subjects"]]
        descriptors = per_subject[subjects[0]][str(t)]["family"]
        lat = {
            d: [per_subject[sj][str(t)]["latent"]["excess"][i] for sj in subjects] for i, d in enumerate(descriptors)
        }
        err = {
            d: [
                (per_subject[sj][str(t)]["latent"]["ci_low"][i], per_subject[sj][str(t)]["latent"]["ci_high"][i])
                for sj in subjects
            ]
            for i, d in enumerate(descriptors)
        }
        s.image(
            bar_chart(subjects, lat, f"{family}: latent excess alignment (95% CI)", "excess cosine", err),
            "descriptor ranking per subject: bars above zero are what the subject defaults to",
        )
        if "image" in per_subject[subjects[0]][str(t)]:
            rates = {
                d: [per_subject[sj][str(t)]["image"]["rates"][i] for sj in subjects] for i, d in enumerate(descriptors)
            }
            cis = {
                d: [tuple(per_subject[sj][str(t)]["image"]["ci95"][i]) for sj in subjects]
                for i, d in enumerate(descriptors)
            }
            s.image(
                bar_chart(
                    subjects, rates, f"{family}: caption rates of the generated images (Wilson 95%)", "rate", cis
                ),
                "the same question answered from the images",
            )
        ts = results["timesteps"]
        by_t = np.array([[r["scores_by_t"][str(tt)] for tt in ts] for r in entry["subjects"]])
        s.image(
            heatmap(by_t, subjects, [f"t={tt}" for tt in ts], f"{family}: latent bias score along the trajectory"),
            "the score at every sampler step (noisy to clean)",
        )
        profiles = results["prompt_profiles"].get(family)
        if profiles:
            s.image(
                heatmap(
                    np.array(profiles["values"]),
                    profiles["prompts"],
                    profiles["descriptors"],
                    f"prompts x {family} (family-centred cosine, t={t})",
                    cmap="RdBu_r",
                ),
                "every prompt's mean alignment with each descriptor direction",
            )
    if world_check:
        s.table(
            ["check against the planted truth", "result"],
            [
                [
                    "latent scores ordered " + " > ".join(world_check["order"]),
                    _yes(world_check["latent_order_correct"]),
                ],
                [
                    "... at every step",
                    f"{sum(world_check['order_correct_by_t'].values())} of "
                    f"{len(world_check['order_correct_by_t'])} steps",
                ],
                ["strong and unbiased CIs apart", _yes(world_check.get("strong_unbiased_cis_apart"))],
                ["unbiased shape not significant", _yes(world_check.get("unbiased_not_significant"))],
                [
                    "image rates within 10 points of planted (max error)",
                    f"{_yes(world_check['image_rates_within_10_points'])} "
                    f"({max(world_check['image_rate_max_error'].values()):.3f})",
                ],
            ],
            "the shapes world: what was planted vs what was found",
        )
    if results["clusters"]:
        clusters: ClusterStep = results["clusters"][layer][str(t)]
        fits = clusters.fits()
        rows = [[kind, f"{fit.ari:.3f}", f"{fit.p_value:.4f}", f"{fit.null_q95:.3f}"] for kind, fit in fits.items()]
        s.table(
            ["prompt latents", "ARI", "p (labels permuted)", "null 95%"],
            rows,
            f"k-means (k={clusters.k}) on prompt latents vs the {cfg['cluster_by']} grouping"
            + (
                f"; 'removed': the {', '.join(cfg['cluster_remove'])} directions projected out first"
                if cfg["cluster_remove"]
                else ""
            )
            + (
                f"; each sample's map {cfg['cluster_pooling']}-pooled over positions first"
                if cfg.get("cluster_pooling", "none") != "none"
                else ""
            ),
        )
        kind = "removed" if "removed" in fits else "raw"
        members: dict[int, list[str]] = {}
        for prompt, c in zip(clusters.prompts, fits[kind].clusters):
            members.setdefault(c, []).append(prompt)
        s.table(["cluster", "prompts"], [[c, ", ".join(p)] for c, p in sorted(members.items())], f"clusters ({kind})")
    _sample_grids(s, results, Path(run_dir), grid_samples)
    return s


def _sample_grids(s: Section, results: dict[str, Any], run_dir: Path, n: int) -> None:
    from diffdissect.store import open_store

    rows = open_store(run_dir / "trajectories").rows()
    subjects = [r["subject"] for e in results["summary"]["families"].values() for r in e["subjects"]]
    for subject in dict.fromkeys(subjects):
        paths = [r["image"] for r in rows if r["caption"] == subject and r.get("image")][:n]
        if paths:
            images = np.stack([np.asarray(Image.open(run_dir / "trajectories" / p).convert("RGB")) for p in paths])
            s.image(image_grid(images, columns=8, scale=2), f"samples of {subject!r}")


def _yes(value: Any) -> str:
    return "yes" if value else ("NO" if value is not None else "n/a")


def write_directions_report(
    results: dict[str, Any], run_dir: str | Path, world_check: dict[str, Any] | None = None
) -> Path:
    report = Report("diffdissect directions")
    directions_section(report, results, run_dir, world_check)
    return report.write(Path(run_dir) / "report.html")
