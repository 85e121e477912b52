"""The shapes-world targets of `diffdissect steer` (issue 17), and the cost of sampling with edits.

    python benchmarks/steer_world.py --directions RUN --out OUT [--seeds 16 --steps 10 --guidance 4]

RUN is a `diffdissect directions world` run (word directions at mid_block, the same sampler steps).
Measured, with the world's attribute captioner as the judge:
  * colour flips: for each colour c, add the c word direction at mid_block while sampling "a {p} {shape}"
    for every prompt colour p; the 4x4 matrix of the rate at which the judged colour is c. alpha is chosen
    per c on the even seeds (the largest flip rate with shape, size and position kept in >= 80%) and the
    figures are reported on the odd seeds (held out), with Wilson intervals;
  * control: random whole-map directions of the same norm at the same alphas (colour-change rate);
  * identity: alpha = 0 and an SAE edit that moves no latent reproduce the unedited image bit for bit;
  * cost: sampling with an add edit (hooks active) vs plain sampling, interleaved rounds.
Writes OUT/targets.json and prints the table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from diffdissect.intervene import (
    Intervention,
    Judge,
    SteerConfig,
    layer_shapes,
    run_steer,
)
from diffdissect.stats import wilson

FACTORS_KEPT = ("shape", "size", "xpos", "ypos")


def _readings(out: Path) -> dict[str, dict]:
    return {r["image"]: r["values"] for r in json.loads((out / "readings.json").read_text())["images"]}


def colour_matrix(target, judge, run: Path, out: Path, args) -> dict:
    colours = judge.attributes["colour"]
    shapes = judge.attributes["shape"]
    prompts = [f"a {p} {s}" for p in colours for s in shapes]
    edits = [f"add@mid_block=directions:{run}#{c}" for c in colours]
    controls = [f"add@mid_block=random:{i}#map" for i in range(2)]
    config = SteerConfig(prompts=prompts, edits=edits + controls, seeds=list(range(args.seeds)), alphas=args.alphas,
                         steps=args.steps, guidance=args.guidance, branch=args.branch, batch_size=args.seeds,
                         attributes=judge.attributes, expect=[f"colour={c}" for c in colours] + ["-"] * len(controls),
                         save_images=False)
    result = run_steer(target, config, out / "colours", judge)
    reads = _readings(out / "colours")
    seeds = {"val": config.seeds[0::2], "test": config.seeds[1::2]}

    def rates(k: int, alpha: float, part: str, c: str | None) -> dict:
        per_prompt_colour: dict[str, list[bool]] = {p: [] for p in colours}
        kept: dict[str, list[bool]] = {f: [] for f in FACTORS_KEPT}
        changed: list[bool] = []
        for i, prompt in enumerate(prompts):
            p_colour = prompt.split()[1]
            for s in seeds[part]:
                edited = reads[f"e{k}/a{alpha:g}/p{i}-s{s}"]
                base = reads[f"base/p{i}-s{s}"]
                if c is not None:
                    per_prompt_colour[p_colour].append(edited["colour"] == c)
                changed.append(edited["colour"] != base["colour"])
                for f in FACTORS_KEPT:
                    if base[f] is not None:
                        kept[f].append(edited[f] == base[f])
        other = [x for p, v in per_prompt_colour.items() if p != c for x in v]
        return {"matrix_row": {p: float(np.mean(v)) if v else None for p, v in per_prompt_colour.items()},
                "flip": float(np.mean(other)) if other else None, "flip_n": len(other),
                "flip_ci": wilson(int(sum(other)), len(other)) if other else None,
                "keep": {f: float(np.mean(v)) for f, v in kept.items()},
                "keep_ci": {f: wilson(int(sum(v)), len(v)) for f, v in kept.items()},
                "colour_changed": float(np.mean(changed)), "colour_changed_ci": wilson(int(sum(changed)), len(changed))}

    table = {}
    for k, c in enumerate(colours):
        val = {a: rates(k, a, "val", c) for a in config.alphas if a != 0}
        ok = [a for a, r in val.items() if min(r["keep"].values()) >= 0.8] or list(val)
        best = max(ok, key=lambda a: val[a]["flip"])
        table[c] = {"alpha": best, "validation": val[best], "test": rates(k, best, "test", c),
                    "by_alpha_test": {a: rates(k, a, "test", c) for a in config.alphas}}
    control = {f"random:{i}": {a: rates(len(colours) + i, a, "test", None) for a in config.alphas}
               for i in range(len(controls))}
    identical = {e.edit: e.identical for e in result.effects if e.alpha == 0}
    return {"colours": colours, "table": table, "control": control, "alpha0_identical": identical,
            "n_samples_per_alpha": len(prompts) * len(config.seeds), "calibration": result.calibration,
            "cost": result.cost}


def colourless(target, judge, run: Path, out: Path, args) -> dict:
    """Prompts naming every factor but colour ("a small circle at the top left"): each colour's word direction at
    mid_block and (when the removal run's SAE exists) its best-AUROC latent at the removal layer, plus a random
    map; the rate of the judged colour and the keeps of the prompted factors, per alpha (a sweep)."""
    colours = judge.attributes["colour"]
    prompts = [f"a {size} {shape} at the {y} {x}" for shape in judge.attributes["shape"]
               for size, y, x in (("small", "top", "left"), ("large", "bottom", "right"))]
    edits = [f"add@mid_block=directions:{run}#{c}" for c in colours]
    expect = [f"colour={c}" for c in colours]
    sae_dir = out / "removal" / "sae"
    if (sae_dir / "config.json").is_file():
        from diffdissect.sae.features import analyse_features

        features, _, _ = analyse_features(sae_dir, label_columns=["colour"])
        best = features["best_latent_per_value"]["colour"]
        edits += [f"sae-set@{args.removal_layer}={sae_dir}#{best[c]['latent']}" for c in colours]
        expect += [f"colour={c}" for c in colours]
    edits.append("add@mid_block=random:0#map")
    expect.append("-")
    config = SteerConfig(prompts=prompts, edits=edits, expect=expect, seeds=list(range(args.seeds)),
                         alphas=args.colourless_alphas, steps=args.steps, guidance=args.guidance, branch=args.branch,
                         batch_size=args.seeds, attributes=judge.attributes, save_images=False)
    result = run_steer(target, config, out / "colourless", judge)
    return {"prompts": prompts, "effects": [e.to_json() for e in result.effects]}


def noop_sae(target, out: Path, args) -> dict:
    from diffdissect.sae.foreign import export_sparsify
    from diffdissect.sae.model import SAEConfig, TopKSAE

    c = layer_shapes(target, ["mid_block"])["mid_block"][0]
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=c, n_latents=4 * c, k=8))
    with torch.no_grad():
        sae.b_enc[-1] = -1e6                      # a latent that never fires: zeroing it moves nothing
    export_sparsify(sae, out / "sae", "unet.mid_block")
    config = SteerConfig(prompts=["a red square", "a blue circle"], seeds=list(range(4)), alphas=[0.0],
                         steps=args.steps, guidance=args.guidance, save_images=False,
                         edits=[f"sae-scale@mid_block={out / 'sae'}#0,1,2;value=1",
                                f"sae-zero@mid_block={out / 'sae'}#{4 * c - 1}"])
    result = run_steer(target, config, out / "noop", None)
    return {e.edit: {"identical": e.identical, "n": e.n} for e in result.effects}


def removal(target, judge, out: Path, args) -> dict:
    """SAeUron's concept removal on the shapes world: an SAE on the layer's per-location activations of
    captioned world images, the latents chosen for shape=square by held-out AUROC, ablated at every step."""
    from diffdissect.capture import CaptureConfig, capture
    from diffdissect.sae import TrainConfig, train_sae
    from diffdissect.sae.features import analyse_features

    work = out / "removal"
    layer, t = args.removal_layer, args.removal_t
    if not (work / "store" / "manifest.json").is_file() or "complete" not in (work / "store" / "manifest.json").read_text():
        source, _ = args.world.source(args.removal_images)
        spec = CaptureConfig(layers=[layer], timesteps=[t], seeds=[0], batch_size=128, pooling="none", dtype="float32",
                           use_captions=True)
        capture(target, source, spec, work / "store", progress=False)
    train = TrainConfig(layer=layer, t=t, tokens=True, k=args.removal_k, expansion=8, epochs=args.removal_epochs,
                        batch_size=1024)
    summary = train_sae(work / "store", train, work / "sae", progress=False)
    features, _, _ = analyse_features(work / "sae", label_columns=["shape"])
    aurocs = np.array([lat["auroc"]["shape"]["square"] for lat in features["latents"]])
    order = np.argsort(-aurocs)
    chosen = [int(j) for j in order[: args.removal_latents]]
    shapes = judge.attributes["shape"]
    prompts = [f"a {s}" for s in shapes]
    latents = ",".join(map(str, chosen))
    edits = [f"sae-zero@{layer}={work / 'sae'}#{latents}"] + [
        f"sae-scale@{layer}={work / 'sae'}#{latents};value={v:g}" for v in args.removal_scales]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    config = SteerConfig(prompts=prompts, edits=edits, seeds=seeds, alphas=[0.0], steps=args.steps,
                         guidance=args.guidance, batch_size=args.seeds, attributes=judge.attributes, save_images=False)
    run_steer(target, config, work / "steer", judge)
    reads = _readings(work / "steer")
    table = {}
    for k, edit in enumerate(edits):
        row = {}
        for i, shape in enumerate(shapes):
            base = [reads[f"base/p{i}-s{s}"]["shape"] == shape for s in config.seeds]
            edited = [reads[f"e{k}/a-/p{i}-s{s}"]["shape"] == shape for s in config.seeds]
            squares = [reads[f"e{k}/a-/p{i}-s{s}"]["shape"] == "square" for s in config.seeds]
            row[shape] = {"base_rate": float(np.mean(base)), "edited_rate": float(np.mean(edited)),
                          "edited_ci": wilson(int(sum(edited)), len(edited)), "square_rate": float(np.mean(squares))}
        table[edit.split("=", 1)[0] + (";" + edit.split(";", 1)[1] if ";" in edit else "")] = row
    return {"layer": layer, "t": t, "sae": {k: summary.get(k) for k in ("metrics",) if k in summary},
            "chosen": chosen, "chosen_auroc": [float(aurocs[j]) for j in chosen], "table": table,
            "n_per_prompt": len(config.seeds)}


def latent_flips(target, judge, out: Path, args) -> dict:
    """For each colour value, the SAE latent with the best held-out AUROC (the removal run's SAE) set to alpha x
    the layer's norm while sampling prompts naming another colour; the rate at which the judged colour flips."""
    from diffdissect.sae.features import analyse_features

    work = out / "removal"
    if not (work / "sae" / "config.json").is_file():
        raise SystemExit("run the removal part first (it trains the SAE)")
    features, _, _ = analyse_features(work / "sae", label_columns=["colour"])
    best = features["best_latent_per_value"]["colour"]
    colours, shapes = judge.attributes["colour"], judge.attributes["shape"][:2]
    prompts = [f"a {p} {s}" for p in colours for s in shapes]
    edits = [f"sae-set@{args.removal_layer}={work / 'sae'}#{best[c]['latent']}" for c in colours]
    config = SteerConfig(prompts=prompts, edits=edits, seeds=list(range(args.seeds)), alphas=args.latent_alphas,
                         steps=args.steps, guidance=args.guidance, branch=args.branch, batch_size=args.seeds,
                         attributes=judge.attributes, expect=[f"colour={c}" for c in colours], save_images=False)
    run_steer(target, config, work / "latents", judge)
    reads = _readings(work / "latents")
    table = {}
    for k, c in enumerate(colours):
        by_alpha = {}
        for a in config.alphas:
            flips, kept = [], {f: [] for f in FACTORS_KEPT}
            for i, prompt in enumerate(prompts):
                if prompt.split()[1] == c:
                    continue
                for s in config.seeds:
                    e, b = reads[f"e{k}/a{a:g}/p{i}-s{s}"], reads[f"base/p{i}-s{s}"]
                    flips.append(e["colour"] == c)
                    for f in FACTORS_KEPT:
                        if b[f] is not None:
                            kept[f].append(e[f] == b[f])
            by_alpha[a] = {"flip": float(np.mean(flips)), "flip_ci": wilson(int(sum(flips)), len(flips)),
                           "keep": {f: float(np.mean(v)) for f, v in kept.items()}, "n": len(flips)}
        table[c] = {"latent": best[c]["latent"], "auroc": best[c]["auroc"], "by_alpha": by_alpha}
    return {"layer": args.removal_layer, "t": args.removal_t, "table": table}


def cost(target, args) -> dict:
    """Plain sampling vs sampling with an add edit at mid_block, interleaved; per-round ratios."""
    pipe = target.pipeline
    pipe.set_progress_bar_config(disable=True)
    from diffdissect.intervene.edits import AddEdit, Direction

    c = layer_shapes(target, ["mid_block"])["mid_block"][0]
    edit = AddEdit("mid_block", Direction("v", vector=torch.randn(c, generator=torch.Generator().manual_seed(0))))

    def sample():
        pipe(prompt=["a red square"] * args.cost_batch, num_inference_steps=args.steps, guidance_scale=args.guidance,
             generator=[torch.Generator().manual_seed(s) for s in range(args.cost_batch)], output_type="np")

    from diffdissect.intervene.edits import SAEEdit
    from diffdissect.sae.model import SAEConfig, TopKSAE

    torch.manual_seed(0)
    sae_edit = SAEEdit("mid_block", TopKSAE(SAEConfig(d_in=c, n_latents=8 * c, k=16)).eval(), [0, 1, 2, 3], "zero")
    plain, edited, sae = [], [], []
    sample()
    for _ in range(args.cost_rounds):
        start = time.perf_counter()
        sample()
        plain.append(time.perf_counter() - start)
        for edits, times in (([edit], edited), ([sae_edit], sae)):
            with Intervention(target, edits, scales={"mid_block": 1.0}, alpha=1.0) as iv:
                iv.samples = args.cost_batch
                start = time.perf_counter()
                sample()
                times.append(time.perf_counter() - start)
    ratios = [e / p for e, p in zip(edited, plain)]
    sae_ratios = [e / p for e, p in zip(sae, plain)]
    return {"plain_s": plain, "edited_s": edited, "sae_s": sae, "ratio_median": float(np.median(ratios)),
            "ratio_of_sums": sum(edited) / sum(plain), "sae_ratio_median": float(np.median(sae_ratios)),
            "batch": args.cost_batch, "rounds": args.cost_rounds, "load": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directions", required=True, help="a `directions world` run directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--first-seed", type=int, default=0, help="removal: seeds first..first+seeds-1 (held out: "
                        "a range not used when choosing the scale)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--branch", default="cond")
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.0, 2.0, 3.0, 4.0])
    parser.add_argument("--cost-batch", type=int, default=16)
    parser.add_argument("--cost-rounds", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: colours noop colourless removal latents cost")
    parser.add_argument("--latent-alphas", nargs="+", type=float, default=[0.0, 2.0, 4.0, 8.0])
    parser.add_argument("--colourless-alphas", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    parser.add_argument("--removal-layer", default="up_blocks.0")
    parser.add_argument("--removal-t", type=int, default=500)
    parser.add_argument("--removal-images", type=int, default=1024)
    parser.add_argument("--removal-k", type=int, default=16)
    parser.add_argument("--removal-epochs", type=float, default=10.0)
    parser.add_argument("--removal-latents", type=int, default=8)
    parser.add_argument("--removal-scales", nargs="*", type=float, default=[-1.0, -4.0])
    args = parser.parse_args()
    torch.set_num_threads(1)

    from diffdissect.world import ShapesWorld
    from diffdissect.world.generator import FACTORS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.world = world = ShapesWorld.load()
    target = world.target()
    judge = Judge(world.captioner(), {f: world.config.values(f) for f in FACTORS})
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k != "world"}, "load_start": os.getloadavg()}
    started = time.perf_counter()
    if "colours" not in args.skip:
        results["colours"] = colour_matrix(target, judge, Path(args.directions), out, args)
    if "noop" not in args.skip:
        results["noop_sae"] = noop_sae(target, out, args)
    if "colourless" not in args.skip:
        results["colourless"] = colourless(target, judge, Path(args.directions), out, args)
    if "removal" not in args.skip:
        results["removal"] = removal(target, judge, out, args)
    if "latents" not in args.skip:
        results["latents"] = latent_flips(target, judge, out, args)
    if "cost" not in args.skip:
        results["cost"] = cost(target, args)
    results["seconds"] = time.perf_counter() - started
    (out / "targets.json").write_text(json.dumps(results, indent=1))
    if "colours" in results:
        col = results["colours"]
        print("target | alpha | " + " | ".join(f"prompt {p}" for p in col["colours"]) + " | flip (test) | keep min")
        for c, row in col["table"].items():
            t = row["test"]
            cells = " | ".join(f"{v:.2f}" for v in t["matrix_row"].values())
            print(f"{c} | {row['alpha']:g} | {cells} | {t['flip']:.2f} [{t['flip_ci'][0]:.2f}, {t['flip_ci'][1]:.2f}]"
                  f" | {min(t['keep'].values()):.2f} ({min(t['keep'], key=t['keep'].get)})")
        for name, by_alpha in col["control"].items():
            print(name, {a: round(r["colour_changed"], 3) for a, r in by_alpha.items()})
        print("alpha=0 identical:", col["alpha0_identical"], "of", col["n_samples_per_alpha"])
    if "noop_sae" in results:
        print("no-op SAE:", results["noop_sae"])
    if "colourless" in results:
        for e in results["colourless"]["effects"]:
            print("colourless", e["edit"], e["alpha"], e["target_rate"], {k: round(v["rate"], 2) for k, v in e["keep"].items()
                                                                         if v["rate"] is not None})
    if "removal" in results:
        rem = results["removal"]
        print("removal latents", rem["chosen"], "AUROC", [round(a, 3) for a in rem["chosen_auroc"]])
        for edit, row in rem["table"].items():
            print(edit, {s: (round(r["base_rate"], 2), round(r["edited_rate"], 2)) for s, r in row.items()})
    if "latents" in results:
        for c, row in results["latents"]["table"].items():
            print("latent", c, row["latent"], round(row["auroc"], 3), {a: (round(r["flip"], 2), round(min(r["keep"].values()), 2))
                                                                   for a, r in row["by_alpha"].items()})
    if "cost" in results:
        print("cost ratio add (median, sum):", round(results["cost"]["ratio_median"], 3),
              round(results["cost"]["ratio_of_sums"], 3), "SAE edit (median):", round(results["cost"]["sae_ratio_median"], 3),
              "load", results["cost"]["load"])


if __name__ == "__main__":
    main()
