"""The `diffdissect` command: a thin layer over the library API (argparse; lists are space-separated)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from diffdissect.errors import DiffdissectError
from diffdissect.runtime import quiet_libraries, version


def build_parser() -> argparse.ArgumentParser:
    from diffdissect.capture.spec import CaptureConfig, TrajectoryConfig
    from diffdissect.directions import DirectionsConfig
    from diffdissect.invert.train import InvertTrainConfig
    from diffdissect.options import add_config_arguments
    from diffdissect.probe import ProbeConfig, SplitConfig
    from diffdissect.sae.attribution import AttributionConfig
    from diffdissect.sae.sweep import SWEPT as SAE_SWEPT
    from diffdissect.sae.train import TrainConfig as SAETrainConfig
    from diffdissect.world.demo import DemoConfig
    from diffdissect.world.evaluate import EvalConfig

    parser = argparse.ArgumentParser(prog="diffdissect", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("layers", help="list hookable module paths with their output shapes")
    _model_args(p)
    p.add_argument("--depth", type=int, default=2, help="max dotted parts of a path (0: all) [2]")
    p.add_argument("--filter", default=None, help="only paths containing this text")
    p.add_argument("--json", default=None, metavar="PATH", help="write the layers as JSON here ('-': print it)")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("capture", help="capture activations into a store (images, or prompts: trajectories)")
    _model_args(p)
    src = p.add_argument_group("inputs (one of --images, --dataset, --prompts/--prompt-file)")
    src.add_argument("--images", help="folder of images (recursive)")
    src.add_argument("--labels-csv", help="CSV beside --images with file/label/caption columns")
    src.add_argument("--id-column", default="file", help="CSV column naming the image file [file]")
    src.add_argument("--dataset", help="Hugging Face dataset: a save_to_disk folder or a cached name")
    src.add_argument("--split", default=None)
    src.add_argument("--image-column", default="image")
    src.add_argument("--label-column", default=None, help="label column (CSV: [label])")
    src.add_argument("--caption-column", default=None, help="caption column (CSV: [caption])")
    src.add_argument("--prompts", nargs="+", help="trajectory mode: sample these prompts (DiT: class ids/names)")
    src.add_argument("--prompt-file", help="trajectory mode: one prompt per line")
    add_config_arguments(p, CaptureConfig, required=["layers"])
    add_config_arguments(
        p, TrajectoryConfig, only=["steps", "guidance_scale", "branch"], flags={"guidance_scale": "--guidance"}
    )
    p.add_argument("--out", required=True, help="store directory (resumed if it holds the same capture)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_capture)

    store = sub.add_parser("store", help="inspect an activation store").add_subparsers(dest="store_command")
    p = store.add_parser("info", help="summarise a store")
    p.add_argument("directory")
    p.add_argument("--json", default=None, metavar="PATH", help="write the summary as JSON here ('-': print it)")
    p.set_defaults(func=cmd_store_info)
    p = store.add_parser("verify", help="check every shard's size, checksum and contents")
    p.add_argument("directory")
    p.set_defaults(func=cmd_store_verify)

    p = sub.add_parser("probe", help="a probe per (layer, t) cell of a store, with splits, controls and CIs")
    p.add_argument("store", help="activation store directory")
    add_config_arguments(p, ProbeConfig, exclude=["split", "max_iter", "batch_mb"], flags={"l2_grid": "--l2"})
    p.add_argument(
        "--split-fractions",
        dest="split",
        nargs=3,
        type=float,
        default=[SplitConfig().train, SplitConfig().val, SplitConfig().test],
        metavar=("TRAIN", "VAL", "TEST"),
        help="image fractions per split [0.6 0.2 0.2]",
    )
    p.add_argument("--out", required=True, help="output directory (probes.json/.csv, splits.csv, heatmaps, report)")
    p.set_defaults(func=cmd_probe)

    sae = sub.add_parser("sae", help="k-sparse autoencoders on store slices").add_subparsers(dest="sae_command")
    p = sae.add_parser("train", help="train TopK SAEs: every combination of --layers x --timesteps x --k x --expansion")
    p.add_argument("store", help="activation store directory")
    p.add_argument("--config", default=None, help="JSON file of training options (flags given here override it)")
    add_config_arguments(
        p,
        SAETrainConfig,
        unset=True,
        several=SAE_SWEPT,
        exclude=["aux_alpha", "dead_window", "heldout_fraction", "normalise", "checkpoint_every"],
        flags={"layer": "--layers", "t": "--timesteps", "steps": "--train-steps"},
    )
    p.add_argument("--out", required=True, help="runs directory: one sub-directory per SAE (resumed if present)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sae_train)
    p = sae.add_parser("features", help="what each latent responds to; writes features.json and a browser page")
    p.add_argument("sae", help="an SAE directory written by `sae train`")
    p.add_argument("--store", default=None, help="the store it was trained on [the one in its config]")
    p.add_argument("--labels", nargs="*", default=None, help="label columns for purity and AUROC [all]")
    p.add_argument("--top", type=int, default=16, help="top images per latent [16]")
    p.add_argument("--images", default=None, help="image folder of the capture (for thumbnails) [from the manifest]")
    p.add_argument("--out", default=None, help="output directory [the SAE directory]")
    p.add_argument(
        "--captioner",
        default=None,
        help="caption the held-out images (world, or a local transformers "
        "image-to-text directory) to label latents by words, when the store holds no captions",
    )
    add_config_arguments(p.add_argument_group("held-out attribution"), AttributionConfig, exclude=["mask_threshold"])
    p.add_argument("--device", default="cpu", help="where the codes are computed: cpu, cuda, cuda:N, mps [cpu]")
    p.add_argument(
        "--causal-model",
        default=None,
        help="causal columns: sample this pipeline ('world': the shapes "
        "world's) with each top latent turned up and ablated, judged by --judge [off]",
    )
    p.add_argument(
        "--judge",
        default="world",
        help="causal columns' judge: 'world' or a local transformers image-to-text directory [world]",
    )
    _attributes_arg(p)
    p.add_argument("--weights", default=None, help="shapes-world weights directory [the committed ones]")
    _causal_args(p)
    p.set_defaults(func=cmd_sae_features)

    directions = sub.add_parser(
        "directions", help="prompt-driven h-space directions and what prompts default to (Decoding Diffusion)"
    ).add_subparsers(dest="directions_command")
    p = directions.add_parser("run", help="sample prompts x seeds, caption, directions per word, bias and clusters")
    _model_args(p)
    src = p.add_argument_group("prompts (one or more of --prompts, --prompt-file, --template)")
    src.add_argument("--prompts", nargs="+", default=None, help="prompts")
    src.add_argument("--prompt-file", default=None, help="one prompt per line")
    src.add_argument("--template", nargs="+", default=None, help='templates with slots, e.g. "a {colour} {shape}"')
    src.add_argument("--slot", nargs="+", default=None, help="slot values: NAME=value1,value2 ...")
    _directions_args(p)
    p.add_argument(
        "--captioner",
        default="none",
        help="none, world (shapes-world captioner) or a local transformers image-to-text directory [none]",
    )
    p.add_argument("--family", nargs="+", default=None, help="descriptor families: NAME=word1,word2 ...")
    p.add_argument("--subjects", nargs="+", default=None, help="subject prompts whose defaults to measure")
    add_config_arguments(p, DirectionsConfig, only=["cluster_by", "cluster_remove", "cluster_pooling"])
    p.set_defaults(func=cmd_directions_run)
    p = directions.add_parser("world", help="the analysis on the shapes world, checked against the planted defaults")
    p.add_argument("--weights", default=None, help="shapes-world weights directory [the committed ones]")
    _directions_args(p, world=True)
    p.set_defaults(func=cmd_directions_world)

    invert = sub.add_parser(
        "invert", help="feature inversion with a conditional diffusion model (FeatInv)"
    ).add_subparsers(dest="invert_command")
    p = invert.add_parser("train", help="train an inverter: classifier features at a layer -> images")
    _model_args(p)
    p.add_argument("--classifier", required=True, help="world:cnn, world:vit or package.module:factory")
    p.add_argument("--layer", required=True, help="module path of the classifier whose output is inverted")
    p.add_argument(
        "--mode",
        choices=["spatial", "pooled"],
        default="spatial",
        help="spatial map, or the pooled vector broadcast over the grid (the baseline) [spatial]",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of training images")
    src.add_argument("--n-world-images", dest="world_images", type=int, help="this many balanced shapes-world images")
    add_config_arguments(
        p,
        InvertTrainConfig,
        only=["steps", "batch_size", "lr", "cond_dropout", "checkpoint_every", "seed"],
        flags={"steps": "--train-steps"},
    )
    p.add_argument("--out", required=True, help="inverter directory (resumed if it holds this run)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_invert_train)
    p = invert.add_parser("sample", help="reconstruct images from their classifier features")
    _model_args(p)
    p.add_argument("--inverter", required=True, help="a directory written by `invert train`")
    p.add_argument("--classifier", required=True, help="the classifier the inverter was trained on")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images whose features to invert")
    src.add_argument("--n-world-images", dest="world_images", type=int, help="this many held-out shapes-world images")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance on the features [3]")
    p.add_argument("--steps", type=int, default=20, help="sampler steps [20]")
    p.add_argument("--out", required=True, help="output folder: PNGs and grid.png")
    p.set_defaults(func=cmd_invert_sample)
    p = invert.add_parser(
        "eval", help="the shapes world's inverters: spatial vs pooled, CNN and ViT, steering, composites, robustness"
    )
    p.add_argument("--weights", default=None, help="shapes-world weights directory [the committed ones]")
    p.add_argument("--n-images", dest="images", type=int, default=256, help="held-out images [256]")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=20, help="sampler steps [20]")
    p.add_argument("--out", required=True, help="folder for results.json and report.html")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_invert_eval)
    p = invert.add_parser(
        "build-world",
        help="train the shapes world's inverters (CNN spatial and pooled, ViT) into the weights directory",
    )
    p.add_argument("--weights", default=None, help="shapes-world weights directory [the committed ones]")
    p.add_argument("--n-images", dest="images", type=int, default=16384, help="training images [16384]")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every inverter's training steps")
    p.add_argument("--only", nargs="+", default=None, help="e.g. cnn-spatial vit-spatial")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_invert_build_world)

    p = sub.add_parser(
        "steer",
        help="sample with edits (add, erase, SAE latents, mean ablation) and measure the "
        "effect: prompts x seeds x alphas x edits",
    )
    _model_args(p)
    _steer_args(p)
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("demo", help="run the main job on the embedded default (the shapes world)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--weights", default=None, help="shapes-world weights directory [the committed ones]")
    add_config_arguments(p, DemoConfig, flags={"images": "--n-images"})
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    toy = sub.add_parser("toy", help="the shapes world: build and evaluate its models").add_subparsers(
        dest="toy_command"
    )
    p = toy.add_parser("build", help="train the toy pipeline and classifiers from scratch (reproducible)")
    p.add_argument("--out", default=None, help="weights directory [the package's committed weights]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.001: a smoke build)")
    p.add_argument("--world", default=None, help="world config JSON [the default shapes world]")
    p.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_toy_build)
    p = toy.add_parser("eval", help="measure the toy pipeline, judged by the attribute captioner")
    p.add_argument("--weights", default=None, help="weights directory [the committed ones]")
    add_config_arguments(
        p, EvalConfig, only=["samples", "steps", "guidance_full"], flags={"guidance_full": "--guidance"}
    )
    p.add_argument("--save", action="store_true", help="write eval.json beside the weights (the demo shows it)")
    p.add_argument("--doc", default=None, help="write the figures as markdown here (e.g. docs/toy-world.md)")
    p.add_argument("--json", default=None, help="write the full results as JSON here")
    p.set_defaults(func=cmd_toy_eval)

    bench = sub.add_parser("bench", help="benchmarks (ratios against a baseline run side by side)")
    bench_commands = bench.add_subparsers(dest="bench_command")
    p = bench_commands.add_parser("world", help="shapes-world generation throughput")
    p.add_argument("--n-images", dest="images", type=int, default=50_000)
    p.set_defaults(func=cmd_bench_world)
    p = bench_commands.add_parser("probe", help="the probe sweep: batched fit vs scikit-learn, passes per (image, t)")
    p.add_argument("--n-images", dest="images", type=int, default=1024, help="shapes-world images to capture [1024]")
    p.add_argument("--store", default=None, help="use this store instead of capturing the shapes world")
    p.add_argument(
        "--revelio-scale",
        action="store_true",
        help="synthetic features at Revelio's scale (d 1280, 5,000 images, 8 cells) instead",
    )
    p.add_argument("--threads", type=int, default=None, help="torch and BLAS threads, both sides [torch's default]")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.set_defaults(func=cmd_bench_probe)
    p = bench_commands.add_parser("sae", help="SAE training throughput vs EleutherAI sparsify, side by side")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--train-steps", dest="steps", type=int, default=8, help="training steps per timed round [8]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quality-steps", type=int, default=100, help="untimed steps before comparing FVU [100]")
    p.add_argument("--no-install", action="store_true", help="do not pip-install the peer if it is missing")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.set_defaults(func=cmd_bench_sae)
    p = bench_commands.add_parser("datapath", help="store -> batches (token stream, reader, SAE) vs a raw read")
    p.add_argument("--rows", type=int, default=1024, help="rows of the synthetic spatial store [1024]")
    p.add_argument("--d-in", type=int, default=1280, help="channels per location [1280]")
    p.add_argument("--map", type=int, default=8, help="h = w of each row's map [8]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sae-steps", type=int, default=6, help="SAE steps per timed round [6]")
    p.add_argument("--no-features", action="store_true", help="skip the sae features memory measurement")
    p.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.set_defaults(func=cmd_bench_datapath)
    p = bench_commands.add_parser("invert", help="inverter training: precomputed features vs per sample (FeatInv)")
    p.add_argument("--n-images", dest="images", type=int, default=4096)
    p.add_argument("--train-steps", dest="steps", type=int, default=40, help="training steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=cmd_bench_invert)
    p = bench_commands.add_parser("distributed", help="capture throughput and memory: 2 ranks vs 1 (torchrun, gloo)")
    p.add_argument("--small", type=int, default=512, help="images of the short run [512]")
    p.add_argument("--large", type=int, default=3072, help="images of the long run [3072]")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_bench_distributed)
    p = bench_commands.add_parser("capture", help="capture overhead and memory")
    p.add_argument("--sd15", action="store_true", help="also run the full-size SD-1.5 UNet (slow on CPU)")
    p.add_argument(
        "--families",
        nargs="+",
        choices=["sdxl", "flux"],
        default=None,
        help="also run SDXL- / FLUX-architecture models at real widths (slow on CPU)",
    )
    p.add_argument("--only-families", action="store_true", help="skip the tiny model and the memory figure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.set_defaults(func=cmd_bench_capture)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", required=True, help="pipeline/model directory, hub id (org/name) or package.module:factory"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--resolution", type=int, default=None, help="override the input resolution (pixels)")
    p.add_argument("--random-init", action="store_true", help="control: same architecture, random weights")
    p.add_argument("--init-seed", type=int, default=0, help="seed of --random-init weights")


def _directions_args(p: argparse.ArgumentParser, world: bool = False) -> None:
    p.add_argument("--n-seeds", dest="seeds", type=int, default=256 if world else 32, help="seeds per prompt (0..N-1)")
    from diffdissect.directions import DirectionsConfig
    from diffdissect.options import add_config_arguments

    add_config_arguments(
        p,
        DirectionsConfig,
        only=["layers", "steps", "batch_size", "method", "permutations", "resamples"]
        + ([] if world else ["guidance_scale"]),
        flags={"guidance_scale": "--guidance"},
    )
    p.add_argument(
        "--source",
        choices=["captions", "prompts"],
        default=None,
        help="texts the directions come from [captions with a captioner, else prompts]",
    )
    p.add_argument("--headline-step", default="last", help="timestep of the headline figures [last]")
    p.add_argument("--out", required=True, help="run directory (resumed if interrupted)")
    p.add_argument("--quiet", action="store_true")


def _directions_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.headline_step != "last" and not args.headline_step.isdigit():
        raise DiffdissectError(f"--headline-step must be 'last' or a timestep t, not {args.headline_step!r}.")
    headline = args.headline_step if args.headline_step == "last" else int(args.headline_step)
    return dict(
        seeds=list(range(args.seeds)),
        layers=args.layers,
        steps=args.steps,
        batch_size=args.batch_size,
        method=args.method,
        headline_step=headline,
        permutations=args.permutations,
        resamples=args.resamples,
    )


def _write_json(path: str, value: Any) -> None:
    """`--json PATH`: write JSON there ('-': print it)."""
    from diffdissect.atomic import atomic_write_json

    if path == "-":
        print(json.dumps(value, indent=2))
    else:
        atomic_write_json(Path(path), value)


def _target(args: argparse.Namespace):
    import torch

    from diffdissect.models import load_target

    return load_target(
        args.model,
        device=args.device,
        dtype=getattr(torch, args.model_dtype),
        random_init=args.random_init,
        seed=args.init_seed,
        resolution=args.resolution,
    )


def _steer_args(p: argparse.ArgumentParser) -> None:
    from diffdissect.intervene.steer import SteerConfig
    from diffdissect.options import add_config_arguments

    add_config_arguments(p, SteerConfig, exclude=["attributes"])
    p.add_argument("--prompt-file", default=None, help="one prompt per line (added to --prompts)")
    p.add_argument(
        "--judge",
        default="none",
        help="the judge: 'world' (the shapes world's captioner), a local "
        "transformers image-to-text model directory, or 'none' [none]",
    )
    _attributes_arg(p)
    p.add_argument("--weights", default=None, help="shapes-world weights directory [the committed ones]")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the effects as JSON to PATH")


def _attributes_arg(p: argparse.ArgumentParser) -> None:
    from diffdissect.intervene.steer import SteerConfig
    from diffdissect.options import field_docs

    p.add_argument(
        "--attributes",
        nargs="+",
        default=None,
        metavar="ATTR=V1,V2",
        help=field_docs(SteerConfig)["attributes"] + " (a transformers judge needs them; 'world' knows its own)",
    )


def _judge(spec: str, attributes: dict[str, list[str]], args: argparse.Namespace):
    """'world' (the shapes world's captioner, reading its factors), a transformers directory, or 'none'."""
    from diffdissect.intervene import Judge

    if spec == "none":
        return None
    if spec == "world":
        from diffdissect.world.generator import FACTORS

        world = _shapes_world(args)
        return Judge(world.captioner(), attributes or {f: world.config.values(f) for f in FACTORS})
    from diffdissect.directions.captioners import load_captioner

    if not attributes:
        raise DiffdissectError("a transformers judge needs --attributes ATTR=V1,V2 ... to read its captions.")
    return Judge(load_captioner(spec), attributes)


def _world_model(model: str, args: argparse.Namespace) -> str:
    """`--model world`: the shapes world's pipeline."""
    return str(_shapes_world(args).pipeline_dir) if model == "world" else model


def _causal_args(p: argparse.ArgumentParser) -> None:
    """CausalConfig's fields as --causal-* flags (the builder's options, renamed so they don't clash with
    `sae features`' own --top)."""
    from diffdissect.intervene.causal import CausalConfig
    from diffdissect.options import add_config_arguments

    group = argparse.ArgumentParser(add_help=False)
    added = add_config_arguments(group, CausalConfig)
    for action in group._actions:
        if action.dest in added:
            action.option_strings = ["--causal-" + s[2:] for s in action.option_strings]
            action.dest = "causal_" + action.dest
            p._add_action(action)


def cmd_steer(args: argparse.Namespace) -> int:
    from diffdissect.data.prompts import read_prompt_file
    from diffdissect.intervene import SteerConfig, run_steer
    from diffdissect.options import config_from_args

    prompts = list(args.prompts or []) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    judge = _judge(args.judge, _parse_attributes(args.attributes), args)
    args.model = _world_model(args.model, args)
    config = config_from_args(
        SteerConfig, args, prompts=prompts, attributes=judge.attributes if judge is not None else {}
    )
    config.validate()
    result = run_steer(_target(args), config, args.out, judge)
    if args.json:
        from diffdissect.atomic import atomic_write_json

        atomic_write_json(Path(args.json), [e.to_json() for e in result.effects])
    for e in result.effects:
        target = (
            ""
            if e.target_rate is None or e.target_ci is None
            else f"  {e.target} {e.target_rate:.2f} [{e.target_ci[0]:.2f}, {e.target_ci[1]:.2f}]"
        )
        keeps = " ".join(f"{a} {v['rate']:.2f}" for a, v in e.keep.items() if v["rate"] is not None)
        print(
            f"{e.edit}  alpha={e.alpha}{target}  keep: {keeps or '-'}  pixel {e.pixel_distance:.3f}  "
            f"identical {e.identical}/{e.n}"
        )
    print(f"wrote {args.out}/report.html")
    return 0


def _parse_attributes(items: list[str] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items or []:
        name, eq, values = item.partition("=")
        if not eq or not name or not values:
            raise DiffdissectError(f"--attributes takes ATTR=V1,V2,..., not {item!r}.")
        out[name] = [v for v in values.split(",") if v]
    return out


def cmd_layers(args: argparse.Namespace) -> int:
    from diffdissect.capture import list_layers

    target = _target(args)
    infos = list_layers(target, max_depth=args.depth or None, contains=args.filter)
    if args.json:
        _write_json(args.json, [i.to_json() for i in infos])
        return 0
    print(
        f"# {target.source} ({type(target.denoiser).__name__}, {target.kind}); input "
        f"{target.resolution}px -> sample {target.sample_shape()}; shapes per sample"
    )
    width = max(len(i.path) for i in infos)
    for info in infos:
        shape = "x".join(map(str, info.shape)) if info.shape else "(no tensor output)"
        print(f"{info.path:<{width}}  {info.module_class:<28} {shape}")
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from diffdissect.capture import CaptureConfig, TrajectoryConfig, capture, capture_trajectories
    from diffdissect.distributed import from_env

    dist = from_env()  # torchrun / accelerate launch: this rank's share; else one process
    if dist.enabled and args.device.startswith("cuda"):
        args.device = f"cuda:{dist.local_rank}"  # one GPU per rank
    prompts = _prompts(args)  # a bad prompt file fails before the model is loaded
    target = _target(args)
    common = {
        "layers": args.layers,
        "seeds": args.seeds,
        "pooling": args.pooling,
        "dtype": args.dtype,
        "tokens_to_grid": args.tokens_to_grid,
        "batch_size": args.batch_size,
    }
    if prompts is not None:
        if dist.enabled:
            raise DiffdissectError(
                "trajectory capture (--prompts) runs in one process; launch it without "
                "torchrun/accelerate, or capture images."
            )
        trajectory_spec = TrajectoryConfig(
            prompts=prompts,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            branch=args.branch,
            shard_size=args.shard_size or 64,
            **common,
        )
        manifest = capture_trajectories(target, trajectory_spec, args.out, progress=not args.quiet)
    else:
        spec = CaptureConfig(
            timesteps=args.timesteps,
            prompt=args.prompt,
            use_captions=args.use_captions,
            class_label=args.class_label,
            labels_as_classes=args.labels_as_classes,
            shard_size=args.shard_size,
            shard_mb=args.shard_mb,
            limit=args.limit,
            early_exit=args.early_exit,
            sigmas=args.sigmas,
            guidance_embedding=args.guidance_embedding,
            **common,
        )
        manifest = capture(target, _source(args), spec, args.out, progress=not args.quiet, dist=dist)
    if dist.is_main:
        skipped = len(manifest.skipped)
        print(
            f"wrote {manifest.rows} rows x {len(manifest.layers)} layers x {len(manifest.timesteps)} timesteps "
            f"to {args.out}"
            + (f" ({skipped} unreadable inputs skipped; see `diffdissect store info`)" if skipped else "")
            + (f" with {dist.world_size} ranks" if dist.enabled else "")
        )
    return 0


def _prompts(args: argparse.Namespace) -> list[str] | None:
    from diffdissect.data.prompts import read_prompt_file

    return read_prompt_file(args.prompt_file) if args.prompt_file else args.prompts


def _source(args: argparse.Namespace):
    from diffdissect.data import FolderSource, HFDatasetSource

    if bool(args.images) == bool(args.dataset):
        raise DiffdissectError("give exactly one input: --images DIR, --dataset PATH_OR_NAME, or --prompts.")
    if args.images:
        return FolderSource(
            args.images,
            args.labels_csv,
            id_column=args.id_column,
            label_column=args.label_column or "label",
            caption_column=args.caption_column or "caption",
        )
    return HFDatasetSource(
        args.dataset,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        caption_column=args.caption_column,
    )


def cmd_store_info(args: argparse.Namespace) -> int:
    from diffdissect.store import open_store
    from diffdissect.store.summary import store_summary

    info = store_summary(open_store(args.directory))
    if args.json:
        _write_json(args.json, info)
        return 0
    print(
        f"store       {args.directory}  ({'complete' if info['complete'] else 'INCOMPLETE: rerun the capture to resume'})"
    )
    print(f"mode        {info['mode']}")
    model = info["model"]
    print(
        f"model       {model.get('source')} ({model.get('class', '-')}, fingerprint {model.get('weights_fingerprint', '-')})"
    )
    print(
        f"rows        {info['rows']} in {info['shards']} shards, {info['bytes'] / 2**20:.1f} MiB, dtype {info['dtype']}"
    )
    print(f"skipped     {info['skipped']} unreadable inputs")
    print("timesteps   t (larger = noisier) | alpha_bar / sigma | noise std | denoiser t")
    for e in info["timesteps"]:
        level = _maybe(e.get("alpha_bar")) if e.get("sigma") is None else f"sigma {e['sigma']:.4f}"
        print(f"            {e['t']:>5} | {level} | {_maybe(e.get('noise_std'))} | {_maybe(e.get('denoiser_t'))}")
    print("layers")
    for layer, meta in info["layers"].items():
        print(f"            {layer}: {'x'.join(map(str, meta['shape']))}")
    return 0


def _maybe(value: float | None) -> str:
    return "     -" if value is None else f"{value:.4f}"


def cmd_store_verify(args: argparse.Namespace) -> int:
    from diffdissect.store import verify_store

    report = verify_store(args.directory)
    for line in report.warnings:
        print(f"warning: {line}")
    for line in report.problems:
        print(f"BAD {line}")
    print(f"{report.shards_checked} shards checked: " + ("OK" if report.ok else f"{len(report.bad_shards)} bad"))
    return 0 if report.ok else 1


def cmd_probe(args: argparse.Namespace) -> int:
    from diffdissect.options import config_from_args
    from diffdissect.probe import ProbeConfig, SplitConfig, probe_section, run_probes, summary_rows, write_probe_outputs
    from diffdissect.report import Report

    config = config_from_args(ProbeConfig, args, split=SplitConfig(*args.split))
    weights: dict[Any, Any] = {}
    results = run_probes(args.store, config, weights=weights)
    paths = write_probe_outputs(results, args.out, weights=weights)
    report = Report(f"diffdissect probe: {args.store}")
    probe_section(report, results)
    report.write(Path(args.out) / "report.html")
    for row in summary_rows(results):
        print(
            f"{row.label}: cell chosen on validation {row.best_layer} @ t={row.best_t}: test "
            f"{row.best_accuracy:.3f} [{row.ci[0]:.3f}, {row.ci[1]:.3f}] (majority class "
            f"{row.chance_majority:.3f}; max over cells of test accuracy {row.test_max_accuracy:.3f}, "
            "biased upwards)"
        )
    print(f"results: {paths['csv']}, {paths['json']}; report: {Path(args.out) / 'report.html'}")
    return 0


def cmd_sae_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from diffdissect.paths import safe_name
    from diffdissect.sae import train_saes
    from diffdissect.sae.sweep import sweep_configs
    from diffdissect.sae.train import TrainConfig

    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    file_options = json.loads(Path(args.config).read_text()) if args.config else {}
    from diffdissect.distributed import from_env

    dist = from_env()  # torchrun / accelerate launch: data-parallel training
    summaries = train_saes(args.store, sweep_configs(file_options, flags), args.out, progress=not args.quiet, dist=dist)
    for s in summaries if dist.is_main else []:
        m = s["metrics"]
        print(
            f"{Path(args.out) / safe_name(s['name'])}: held-out FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, dead {100 * m['dead_fraction']:.1f}% "
            f"({s['tokens_per_s']:,} tokens/s)"
        )
    return 0


def cmd_sae_features(args: argparse.Namespace) -> int:
    from diffdissect.options import config_from_args
    from diffdissect.sae.attribution import AttributionConfig
    from diffdissect.sae.report import feature_summary_lines, write_feature_outputs

    causal = None
    if args.causal_model:
        from diffdissect.intervene.causal import CausalConfig, causal_effects, top_latents
        from diffdissect.sae.checkpoint import read_config

        config = CausalConfig(**{f: getattr(args, "causal_" + f) for f in CausalConfig.__dataclass_fields__})
        judge = _judge(args.judge, _parse_attributes(args.attributes), args)
        if judge is None:
            raise DiffdissectError("the causal columns need a judge (--judge world or a transformers directory).")
        args.model = _world_model(args.causal_model, args)
        args.model_dtype, args.random_init, args.init_seed, args.resolution = "float32", False, 0, None
        layer = read_config(Path(args.sae))["slice"]["layer"]
        out_dir = Path(args.out or args.sae) / "causal"

        def causal(results: dict[str, Any]) -> dict[str, Any]:
            latents = top_latents(results, config.top)
            table = causal_effects(_target(args), Path(args.sae), layer, latents, judge, config, out_dir)
            return {"config": {**vars(config), "judge": judge.name}, "latents": {str(j): v for j, v in table.items()}}

    caption_fn = _held_out_captioner(args) if args.captioner else None
    paths = write_feature_outputs(
        args.sae,
        store=args.store,
        labels=args.labels,
        top_n=args.top,
        images=args.images,
        out=args.out,
        device=args.device,
        caption_fn=caption_fn,
        attribution=config_from_args(AttributionConfig, args),
        causal=causal,
    )
    for line in feature_summary_lines(json.loads(paths["json"].read_text())):
        print(line)
    print(f"features: {paths['json']}\nbrowser: {paths['browser']} (open it in a web browser; no server needed)")
    return 0


def _held_out_captioner(args: argparse.Namespace):
    """Captions of source images by index, from `--captioner` run on the capture's images."""
    import numpy as np
    from PIL import Image

    from diffdissect.directions import load_captioner
    from diffdissect.directions.captioners import caption_images
    from diffdissect.sae.checkpoint import read_config
    from diffdissect.sae.report import image_source_for

    store = args.store or read_config(Path(args.sae))["slice"]["store"]
    source = image_source_for(store, args.images)
    if source is None:
        raise DiffdissectError(
            f"--captioner needs the capture's images and the store {store} names none that can be "
            "read; pass the image folder with --images."
        )
    captioner = _shapes_world(args).captioner() if args.captioner == "world" else load_captioner(args.captioner)

    def caption(indices: list[int]) -> list[str | None]:
        images = [source.load(i).image for i in indices]
        pixels = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
        if len({p.shape for p in pixels}) == 1:
            return caption_images(captioner, np.stack(pixels)).captions
        return [caption_images(captioner, p[None]).captions[0] for p in pixels]

    return caption


def cmd_directions_run(args: argparse.Namespace) -> int:
    from diffdissect.data.prompts import read_prompt_file
    from diffdissect.directions import (
        BiasConfig,
        DirectionsConfig,
        load_captioner,
        run_directions,
        write_directions_report,
    )
    from diffdissect.directions.prompts import build_prompt_set, parse_slot_args

    plain = list(args.prompts or []) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    prompts = build_prompt_set(plain, args.template, parse_slot_args(args.slot))
    families = parse_slot_args(args.family)
    if families and not args.subjects:
        raise DiffdissectError("--family needs --subjects: the prompts whose defaults to measure.")
    captioner = (
        None
        if args.captioner == "none"
        else _shapes_world(args).captioner()
        if args.captioner == "world"
        else load_captioner(args.captioner)
    )
    source = args.source or ("captions" if captioner else "prompts")
    config = DirectionsConfig(
        prompts=prompts,
        guidance_scale=args.guidance_scale,
        text_source=source,
        bias=[BiasConfig(name, words, list(args.subjects)) for name, words in families.items()],
        cluster_by=args.cluster_by,
        cluster_remove=args.cluster_remove,
        cluster_pooling=args.cluster_pooling,
        **_directions_options(args),
    )
    results = run_directions(_target(args), config, args.out, captioner, progress=not args.quiet)
    _print_directions(results, write_directions_report(results, args.out))
    return 0


def cmd_directions_world(args: argparse.Namespace) -> int:
    from diffdissect.directions import run_directions, write_directions_report
    from diffdissect.world.directions import check_against_world, world_directions_config

    shapes_world = _shapes_world(args)
    options = _directions_options(args)
    options.pop("seeds")
    config = world_directions_config(
        shapes_world.config, seeds=args.seeds, text_source=args.source or "captions", **options
    )
    results = run_directions(shapes_world.target(), config, args.out, shapes_world.captioner(), progress=not args.quiet)
    check = check_against_world(results, shapes_world.config)
    from diffdissect.atomic import atomic_write_json

    atomic_write_json(Path(args.out) / "world_check.json", check)
    _print_directions(results, write_directions_report(results, args.out, check))
    print(
        f"planted order {' > '.join(check['order'])}: {'recovered' if check['latent_order_correct'] else 'NOT recovered'}; "
        f"image rates max error {max(check['image_rate_max_error'].values()):.3f}; "
        f"cluster ARI {check['cluster_ari']}"
    )
    return 0


def _print_directions(results: dict[str, Any], report: Path) -> None:
    summary = results["summary"]
    for family, entry in summary["families"].items():
        for r in entry["subjects"]:
            print(
                f"{family}: {r['subject']!r} -> {r['top']} score {r['score']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] "
                f"p(Holm) {r['p_holm']:.4f}{' *' if r['significant'] else ''}"
                + (f"; images: {r['image_top']} excess {r['image_score']:.3f}" if "image_top" in r else "")
            )
    print(f"results: {Path(report).parent / 'results.json'}; report: {report}")


def _shapes_world(args: argparse.Namespace):
    """The shapes world of `--weights` (the committed one without it), checked once."""
    from diffdissect.world import ShapesWorld

    weights = getattr(args, "weights", None)
    return ShapesWorld.load(Path(weights) if weights else None)


def _invert_images(args: argparse.Namespace, target, seed: int):
    from diffdissect.invert.run import folder_images
    from diffdissect.world.invert import world_attributes, world_images

    if args.images:
        return folder_images(args.images, target.resolution), None
    batch = world_images(_shapes_world(args), args.world_images, seed)
    return batch.images, world_attributes(batch)


def cmd_invert_train(args: argparse.Namespace) -> int:
    from diffdissect.invert.data import images_to_pixels
    from diffdissect.invert.features import FeatureExtractor
    from diffdissect.invert.run import train_from_images
    from diffdissect.invert.train import InvertTrainConfig
    from diffdissect.options import config_from_args
    from diffdissect.world.invert import TRAIN_SEED, classifier_spec

    target = _target(args)
    classifier, name = classifier_spec(args.classifier)
    extractor = FeatureExtractor(classifier, args.layer, mode=args.mode)
    images, attributes = _invert_images(args, target, TRAIN_SEED)
    extractor(images_to_pixels(images[:1]))  # a non-spatial layer fails here, before any data is written
    config = config_from_args(InvertTrainConfig, args)
    summary = train_from_images(
        target, extractor, name, images, args.out, config, attributes=attributes, progress=not args.quiet
    )
    print(
        f"{args.out}: {summary['steps']} steps on {summary['examples']} images, feature map "
        f"{'x'.join(map(str, summary['feature_shape']))}, final loss {summary['final_loss']}"
    )
    return 0


def cmd_invert_sample(args: argparse.Namespace) -> int:
    import torch

    from diffdissect.invert.data import images_to_pixels
    from diffdissect.invert.features import FeatureExtractor
    from diffdissect.invert.model import load_inverter
    from diffdissect.invert.report import write_reconstructions
    from diffdissect.invert.sample import invert
    from diffdissect.world.invert import EVAL_SEED, classifier_spec

    target = _target(args)
    inverter = load_inverter(args.inverter, pipeline_identity=target.identity())
    classifier, _ = classifier_spec(args.classifier)
    extractor = FeatureExtractor(classifier, inverter.info["layer"], mode=inverter.info["mode"])
    images, _ = _invert_images(args, target, EVAL_SEED)
    with torch.no_grad():
        features = extractor(images_to_pixels(images))
    recs = invert(target, inverter, features, seeds=tuple(args.seeds), guidance=args.guidance, steps=args.steps)
    out = write_reconstructions(args.out, images, recs, args.seeds)
    print(f"{len(images)} inputs x {len(args.seeds)} seeds -> {out} (grid.png: originals, then one row per seed)")
    return 0


def cmd_invert_eval(args: argparse.Namespace) -> int:
    from diffdissect.atomic import atomic_write_json
    from diffdissect.invert.report import invert_section
    from diffdissect.report import Report
    from diffdissect.world.invert import evaluate_world, strip_images

    shapes_world = _shapes_world(args)
    results = evaluate_world(
        shapes_world.target(),
        shapes_world,
        n=args.images,
        seeds=tuple(args.seeds),
        guidance=args.guidance,
        steps=args.steps,
        progress=not args.quiet,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", strip_images(results))
    report = Report("diffdissect invert: the shapes world")
    invert_section(report, results)
    report.write(out / "report.html")
    for name, m in results["reconstruction"].items():
        f = m["factors"]
        print(
            f"{name}: feature cos {m['feature_cosine_pooled']:.3f}; judge agreement shape {f['shape']['rate']:.3f} "
            f"colour {f['colour']['rate']:.3f} xpos {f['xpos']['rate']:.3f} ypos {f['ypos']['rate']:.3f}"
        )
    print(f"results: {out / 'results.json'}; report: {out / 'report.html'}")
    return 0


def cmd_invert_build_world(args: argparse.Namespace) -> int:
    import torch

    from diffdissect.world.invert import build_world_inverters

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes_world = _shapes_world(args)
    summaries = build_world_inverters(
        shapes_world.target(),
        shapes_world,
        images=args.images,
        scale=args.scale,
        only=args.only,
        progress=not args.quiet,
    )
    for name, s in summaries.items():
        print(
            f"{name}: {s['steps']} steps, {s['steps_per_s']:.2f} steps/s, {s['wall_seconds']:.0f} s, "
            f"final loss {s['final_loss']:.4f}"
        )
    return 0


def cmd_bench_invert(args: argparse.Namespace) -> int:
    from diffdissect.bench.invert import bench_invert

    r = bench_invert(images=args.images, steps=args.steps, rounds=args.rounds)
    print(
        f"inverter training, {r['batch_size']} per batch: precomputed {r['steps_per_s']['precomputed']:.2f} steps/s, "
        f"per sample (FeatInv) {r['steps_per_s']['per_sample']:.2f} steps/s: {r['speedup']:.2f}x; precomputing "
        f"{r['images']} images took {r['precompute_seconds']:.1f} s (break-even after {r['break_even_steps'] or float('nan'):.0f} steps)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


def cmd_bench_distributed(args: argparse.Namespace) -> int:
    from diffdissect.bench.distributed import bench_distributed

    r = bench_distributed(args.small, args.large)
    print(
        f"capture, 1 thread per rank: 1 rank {r['images_per_s'][1]:.1f} images/s, 2 ranks {r['images_per_s'][2]:.1f} "
        f"images/s: {r['scaling_2_vs_1']:.2f}x (marginal {r['marginal_scaling_2_vs_1']:.2f}x); peak RSS per rank vs one process: "
        + ", ".join(f"{x:.2f}" for x in r["peak_rss_ratio_per_rank"])
    )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from diffdissect.options import config_from_args
    from diffdissect.world.demo import DemoConfig, run_demo

    config = config_from_args(DemoConfig, args)
    run_demo(Path(args.out), shapes_world=_shapes_world(args), config=config, progress=not args.quiet)
    return 0


def cmd_toy_build(args: argparse.Namespace) -> int:
    from diffdissect.world.build import DEFAULT_WEIGHTS, BuildConfig, build_toy

    recipe = BuildConfig(seed=args.seed, threads=args.threads)
    if args.scale != 1.0:
        recipe = recipe.scaled(args.scale)
    from diffdissect.world.generator import WorldConfig

    world = WorldConfig.load(args.world) if args.world else None
    out = Path(args.out) if args.out else DEFAULT_WEIGHTS
    had_inverters = (out / "inverters").is_dir()
    info = build_toy(out, recipe, world, progress=not args.quiet)
    print(json.dumps({"out": str(out), "timings_s": info["timings_s"], "metrics": info["metrics"]}, indent=2))
    if had_inverters:
        where = "" if out == DEFAULT_WEIGHTS else f" --weights {out}"
        print(
            f"The inverters in {out} belonged to the previous pipeline and were removed; retrain them with "
            f"`diffdissect invert build-world{where}`.",
            file=sys.stderr,
        )
    return 0


def cmd_toy_eval(args: argparse.Namespace) -> int:
    import datetime
    import platform

    from diffdissect.options import config_from_args
    from diffdissect.world.evaluate import EvalConfig, evaluate_toy, summary, write_toy_world_doc

    config = config_from_args(EvalConfig, args)
    shapes_world = _shapes_world(args)
    results = evaluate_toy(shapes_world, config)
    plain = summary(results)
    if args.save:
        shapes_world.directory.joinpath("eval.json").write_text(json.dumps(plain, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(plain, indent=2))
    if args.doc:
        command = "diffdissect toy eval " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "diffdissect toy eval"
        machine = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {__import__('torch').__version__}"
        write_toy_world_doc(results, args.doc, command, machine, datetime.date.today().isoformat())
    for f, v in plain["full_prompts"]["per_factor"].items():
        print(f"full prompts   {f:<7} match {v['rate']:.3f}  {'ok' if v['pass'] else 'BELOW TARGET'}")
    for shape, v in plain["colour_defaults"]["per_shape"].items():
        print(
            f"colour default {shape:<9} ({v['bias']:<8}) max error {v['max_abs_error']:.3f}  {'ok' if v['pass'] else 'ABOVE TARGET'}"
        )
    for f, v in plain["captioner_accuracy"].items():
        print(f"captioner      {f:<7} accuracy {v['rate']:.3f}  {'ok' if v['pass'] else 'BELOW TARGET'}")
    print("all targets met" if plain["pass"] else "NOT all targets met")
    return 0


def cmd_bench_world(args: argparse.Namespace) -> int:
    from diffdissect.bench.world import run_world_benchmark

    run_world_benchmark(images=args.images)
    return 0


def cmd_bench_probe(args: argparse.Namespace) -> int:
    from diffdissect.bench.probe import run_probe_benchmark, run_revelio_scale_benchmark

    if args.revelio_scale:
        result = run_revelio_scale_benchmark(threads=args.threads or 1)
    else:
        if args.threads:
            import torch
            from threadpoolctl import threadpool_limits

            torch.set_num_threads(args.threads)
            threadpool_limits(args.threads)
        result = run_probe_benchmark(images=args.images, store=args.store)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(result["pass"].values()) else 1


def cmd_bench_sae(args: argparse.Namespace) -> int:
    from diffdissect.bench.sae import run_sae_benchmark

    result = run_sae_benchmark(
        d_in=args.d_in,
        expansion=args.expansion,
        k=args.k,
        batch=args.batch,
        steps=args.steps,
        rounds=args.rounds,
        quality_steps=args.quality_steps,
        install=not args.no_install,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(result["pass"].values()) else 1


def cmd_bench_datapath(args: argparse.Namespace) -> int:
    from diffdissect.bench.datapath import print_table, run_datapath_benchmark

    result = run_datapath_benchmark(
        rows=args.rows,
        d=args.d_in,
        hw=args.map,
        rounds=args.rounds,
        sae_steps=args.sae_steps,
        features=not args.no_features,
        threads=args.threads,
    )
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_bench_capture(args: argparse.Namespace) -> int:
    from diffdissect.bench.capture import run_capture_benchmark

    results = run_capture_benchmark(
        sd15=args.sd15,
        repeats=args.repeats,
        families=args.families,
        tiny=not args.only_families,
        memory=not args.only_families,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version())
        return 0
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except DiffdissectError as exc:
        print(f"diffdissect: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffdissect: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
