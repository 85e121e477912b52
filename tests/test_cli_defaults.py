"""CLI defaults come from the config dataclasses: a flag whose default drifts from its field fails here."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Literal

import pytest

from diffdissect.cli import build_parser
from diffdissect.invert.train import InvertTrainConfig
from diffdissect.options import add_config_arguments, config_from_args, field_docs


def _subparser(parser, *path):
    for name in path:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


def test_invert_train_flag_defaults_are_the_config_defaults():
    parser = _subparser(build_parser(), "invert", "train")
    flags = {a.dest: a.default for a in parser._actions}
    config = InvertTrainConfig()
    checked = 0
    for f in fields(InvertTrainConfig):
        if f.name in flags:
            assert flags[f.name] == getattr(config, f.name), f"--{f.name.replace('_', '-')} drifted from {f.name}"
            checked += 1
    assert checked >= 6 and flags["lr"] == 3e-4  # the learning rate the library (and FeatInv) uses


# Commands and the configs whose fields their flags set. A flag named like a field has the field's default,
# or None (meaning "from --config" or "derived"); the exceptions below say why they differ.
def _command_configs():
    from diffdissect.capture.spec import CaptureConfig, TrajectoryConfig
    from diffdissect.directions import DirectionsConfig
    from diffdissect.probe import ProbeConfig
    from diffdissect.sae import TrainConfig
    from diffdissect.world.demo import DemoConfig
    from diffdissect.world.evaluate import EvalConfig

    return {
        ("capture",): [CaptureConfig, TrajectoryConfig],
        ("probe",): [ProbeConfig],
        ("sae", "train"): [TrainConfig],
        ("directions", "run"): [DirectionsConfig],
        ("invert", "train"): [InvertTrainConfig],
        ("demo",): [DemoConfig],
        ("toy", "eval"): [EvalConfig],
    }


DIFFERENT_ON_PURPOSE = {
    ("directions", "run", "seeds"),  # the flag is a count (seeds 0..n-1), the field the list
    ("probe", "split"),  # three fractions on the command line, a SplitConfig (with its salt) in the config
}


def _field_default(f):
    from dataclasses import MISSING

    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def test_no_flag_default_drifts_from_its_config_field():
    parser = build_parser()
    drifted = []
    for path, classes in _command_configs().items():
        flags = {a.dest: a.default for a in _subparser(parser, *path)._actions}
        for cls in classes:
            for f in fields(cls):
                if f.name not in flags or flags[f.name] is None or (*path, f.name) in DIFFERENT_ON_PURPOSE:
                    continue
                default = _field_default(f)
                if flags[f.name] != default and not (isinstance(default, tuple) and list(default) == flags[f.name]):
                    drifted.append(
                        f"{' '.join(path)} --{f.name.replace('_', '-')}: flag {flags[f.name]!r}, "
                        f"{cls.__name__}.{f.name} {default!r}"
                    )
    assert not drifted, "\n".join(drifted)


# ---- the builder: options from a config dataclass -------------------------------------------------------------
@dataclass
class _Example:
    layers: list[str] = field(default_factory=lambda: ["mid_block"])
    """module paths"""
    timesteps: list[int] = field(default_factory=lambda: [25])
    """training-schedule indices"""
    pooling: Literal["mean", "none"] = "mean"
    """how maps are stored"""
    limit: int | None = None
    """at most this many"""
    shuffle: bool = False
    """shuffle the rows"""
    scale: float = 0.5
    """a scale"""


def test_options_come_from_fields_with_their_docstrings_and_defaults():
    parser = argparse.ArgumentParser()
    assert add_config_arguments(parser, _Example) == ["layers", "timesteps", "pooling", "limit", "shuffle", "scale"]
    assert config_from_args(_Example, parser.parse_args([])) == _Example()
    args = parser.parse_args(
        [
            "--layers",
            "a",
            "b",
            "--timesteps",
            "25",
            "200",
            "--pooling",
            "none",
            "--limit",
            "3",
            "--shuffle",
            "--scale",
            "2",
        ]
    )
    assert config_from_args(_Example, args) == _Example(["a", "b"], [25, 200], "none", 3, True, 2.0)
    assert field_docs(_Example)["timesteps"] == "training-schedule indices"
    assert "module paths [mid_block]" in parser.format_help().replace("\n", " ").replace("  ", " ")
    with pytest.raises(SystemExit):
        parser.parse_args(["--pooling", "max"])


def test_a_field_without_a_docstring_is_refused():
    @dataclass
    class Undocumented:
        steps: int = 3

    with pytest.raises(TypeError, match="Undocumented.steps has no docstring"):
        add_config_arguments(argparse.ArgumentParser(), Undocumented)


# ---- one meaning per flag name across commands --------------------------------------------------------------------
SAMPLING_COMMANDS = {
    "capture",
    "invert sample",
    "invert eval",
    "toy eval",
    "directions run",
    "directions world",
    "steer",
}


def _every_option():
    import argparse

    def walk(parser, path=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*path, name))
            elif action.option_strings:
                yield " ".join(path), action

    return list(walk(build_parser()))


def _value_type(action) -> str:
    if action.nargs == 0:
        return "switch"
    return getattr(action.type, "__name__", "str") if action.type else "str"


def test_a_flag_name_means_one_thing_in_every_command():
    kinds: dict[str, set[tuple[str, str]]] = {}
    for command, action in _every_option():
        for option in action.option_strings:
            kinds.setdefault(option, set()).add((_value_type(action), command))
    mixed = {o: sorted(k) for o, k in kinds.items() if len({t for t, _ in k}) > 1}
    assert not mixed, f"flags whose values differ in kind between commands: {mixed}"
    assert {t for t, _ in kinds["--images"]} == {"str"}  # a folder; a count is --n-images
    assert {t for t, _ in kinds["--json"]} == {"str"}  # always a path
    counts = {o for o in kinds if o.startswith("--n-")}
    assert counts and all({t for t, _ in kinds[o]} == {"int"} for o in counts)
    training = {c for t, c in kinds["--steps"]} - SAMPLING_COMMANDS
    assert not training, f"--steps is sampler steps; use --train-steps in {training}"


def test_toy_eval_options_build_its_config():
    from diffdissect.world.evaluate import EvalConfig

    args = build_parser().parse_args(["toy", "eval", "--samples", "8", "--steps", "3", "--guidance", "2"])
    assert config_from_args(EvalConfig, args) == EvalConfig(samples=8, steps=3, guidance_full=2.0)


def test_demo_options_build_its_config():
    from diffdissect.world.demo import DemoConfig

    args = build_parser().parse_args(
        [
            "demo",
            "--n-images",
            "64",
            "--sae-layers",
            "mid_block",
            "down_blocks.1",
            "--sae-timesteps",
            "25",
            "800",
            "--direction-seeds",
            "0",
        ]
    )
    assert config_from_args(DemoConfig, args) == DemoConfig(
        images=64, sae_layers=["mid_block", "down_blocks.1"], sae_timesteps=[25, 800], direction_seeds=0
    )
    assert config_from_args(DemoConfig, build_parser().parse_args(["demo"])) == DemoConfig()


# ---- probe, capture, sae train and directions: generated from their configs ---------------------------------------
def _generated_commands():
    from diffdissect.capture.spec import CaptureConfig, TrajectoryConfig
    from diffdissect.directions import DirectionsConfig
    from diffdissect.probe import ProbeConfig
    from diffdissect.sae import TrainConfig

    def every(cls, *left_out):
        return [(cls, f.name) for f in fields(cls) if f.name not in left_out]

    directions = ["layers", "steps", "batch_size", "method", "permutations", "resamples"]
    return {
        ("probe",): every(ProbeConfig, "split", "max_iter", "batch_mb"),
        ("capture",): every(CaptureConfig) + [(TrajectoryConfig, n) for n in ("steps", "guidance_scale", "branch")],
        ("sae", "train"): every(
            TrainConfig, "aux_alpha", "dead_window", "heldout_fraction", "normalise", "checkpoint_every"
        ),
        ("directions", "run"): [
            (DirectionsConfig, n)
            for n in directions + ["guidance_scale", "cluster_by", "cluster_remove", "cluster_pooling"]
        ],
        ("directions", "world"): [(DirectionsConfig, n) for n in directions],
    }


def test_probe_capture_sae_and_directions_options_are_their_config_fields():
    parser = build_parser()
    for path, cls_fields in _generated_commands().items():
        helps = {a.dest: a.help or "" for a in _subparser(parser, *path)._actions}
        for cls, name in cls_fields:
            doc = field_docs(cls).get(name)
            assert doc, f"{cls.__name__}.{name} has no docstring"
            assert helps.get(name, "").startswith(doc), (
                f"{' '.join(path)}: option for {cls.__name__}.{name} is not generated from the field"
            )


def test_generated_list_options_keep_their_form_and_build_configs():
    from diffdissect.probe import ProbeConfig, SplitConfig
    from diffdissect.sae.sweep import sweep_configs
    from diffdissect.sae.train import TrainConfig

    parser = build_parser()
    args = parser.parse_args(
        [
            "capture",
            "-m",
            "m",
            "--images",
            "d",
            "--layers",
            "a",
            "b",
            "--timesteps",
            "25",
            "200",
            "--seeds",
            "0",
            "1",
            "--no-early-exit",
            "--out",
            "o",
        ]
    )
    assert (args.layers, args.timesteps, args.seeds, args.early_exit) == (["a", "b"], [25, 200], [0, 1], False)
    assert parser.parse_args(["capture", "-m", "m", "--layers", "a", "--out", "o"]).early_exit is True

    args = parser.parse_args(
        [
            "probe",
            "s",
            "--labels",
            "shape",
            "--layers",
            "a",
            "b",
            "--timesteps",
            "25",
            "200",
            "--l2",
            "0.1",
            "1",
            "--split-fractions",
            "0.5",
            "0.25",
            "0.25",
            "--shuffled-control",
            "--out",
            "o",
        ]
    )
    config = config_from_args(ProbeConfig, args, split=SplitConfig(*args.split))
    assert config == ProbeConfig(
        labels=["shape"],
        layers=["a", "b"],
        timesteps=[25, 200],
        l2_grid=(0.1, 1.0),
        split=SplitConfig(0.5, 0.25, 0.25),
        shuffled_control=True,
    )
    default = parser.parse_args(["probe", "s", "--labels", "shape", "--out", "o"])
    assert config_from_args(ProbeConfig, default, split=SplitConfig(*default.split)) == ProbeConfig(labels=["shape"])

    args = parser.parse_args(
        [
            "sae",
            "train",
            "s",
            "--layers",
            "a",
            "b",
            "--timesteps",
            "25",
            "200",
            "--k",
            "16",
            "32",
            "--train-steps",
            "5",
            "--out",
            "o",
        ]
    )
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    configs = sweep_configs({"batch_size": 64, "k": 8}, flags)
    assert len(configs) == 8 and {(c.layer, c.t, c.k) for c in configs} == {
        (layer, t, k) for layer in "ab" for t in (25, 200) for k in (16, 32)
    }
    assert all(c.steps == 5 and c.batch_size == 64 for c in configs)  # unset flags leave the --config file's value
