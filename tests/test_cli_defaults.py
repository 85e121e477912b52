"""CLI defaults come from the config dataclasses: a flag whose default drifts from its field fails here."""
from __future__ import annotations

from dataclasses import fields

from diffdissect.cli import build_parser
from diffdissect.invert.train import InvertTrainConfig


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
