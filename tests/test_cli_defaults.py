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
    assert checked >= 6 and flags["lr"] == 3e-4          # the learning rate the library (and FeatInv) uses


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
    args = parser.parse_args(["--layers", "a", "b", "--timesteps", "25", "200", "--pooling", "none", "--limit", "3",
                              "--shuffle", "--scale", "2"])
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
