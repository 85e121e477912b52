"""Ground floor: command-line options generated from config dataclasses (the configs are the only source of
defaults; each field's docstring is its help).

    @dataclass
    class TrainConfig:
        steps: int = 3000
        \"\"\"optimiser steps\"\"\"

    add_config_arguments(parser, TrainConfig)          # --steps N  (help: "optimiser steps [3000]")
    config = config_from_args(TrainConfig, args)       # TrainConfig(steps=args.steps)

Field types map to argparse as: int/float/str -> `type=`, `bool` -> `--flag` / `--no-flag`,
`list[int]` / `list[str]` / `tuple[...]` -> `nargs="+"` (so `--layers a b --timesteps 25 200` works),
`X | None` -> `type=X` with default None, `Literal[...]` -> `choices=`. Field docstrings are read from the
class source with `ast` (nothing is run).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

__all__ = ["add_config_arguments", "config_from_args", "field_docs", "flag_name"]


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} for the string literals written right under a dataclass field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        if not isinstance(body, ast.ClassDef):
            continue
        statements = body.body
        for node, after in zip(statements, statements[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(annotation)):
            return args[0], True
    return annotation, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _argparse_kwargs(annotation: Any, default: Any) -> dict[str, Any]:
    annotation, optional = _unwrap_optional(annotation)
    origin = get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = list(get_args(annotation))
        return {"choices": choices, "type": type(choices[0])}
    if origin in (list, tuple, Iterable) or annotation in (list, tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis] or [str]
        return {"nargs": "+", "type": _scalar(args[0])}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"no command-line form for a field of type {annotation!r}")


def _scalar(annotation: Any) -> Any:
    annotation, _ = _unwrap_optional(annotation)
    if get_origin(annotation) is Literal:
        return type(get_args(annotation)[0])
    return annotation if annotation in (int, float, str) else str


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: Iterable[str] = (),
    only: Iterable[str] | None = None,
    required: Iterable[str] = (),
    flags: dict[str, str] | None = None,
    several: Iterable[str] = (),
    unset: bool = False,
) -> list[str]:
    """Add one option per field of the dataclass `cls` (its docstring as help, its default as default).

    `flags` names a field's option where the field name would give a flag with another meaning elsewhere
    (e.g. {"steps": "--train-steps"}: `--steps` is sampler steps in every command). Returns the field names
    added. A field without a docstring is refused: the help must say what it is.

    `several` names scalar fields that take one or more values (a sweep: `--k 16 32` runs both); `unset` leaves
    every option's value None unless given (the help still shows the field's default), for commands whose
    options override another source such as a config file."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    skip, keep, needed = set(exclude), None if only is None else list(only), set(required)
    added = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or f.name in skip or (keep is not None and f.name not in keep):
            continue
        if f.name not in docs:
            raise TypeError(
                f"{cls.__name__}.{f.name} has no docstring: write one under the field (it is the option's help)."
            )
        default = _default(f)
        kwargs = _argparse_kwargs(hints[f.name], default)
        if f.name in several and "nargs" not in kwargs and "action" not in kwargs:
            kwargs["nargs"] = "+"
        hidden = default in (None, dataclasses.MISSING, [], ()) or kwargs.get("action") or f.name in needed
        shown = "" if hidden else f" [{_show(default)}]"
        if f.name in needed or (default is dataclasses.MISSING and not unset):
            kwargs["required"] = True
        elif unset:
            kwargs["default"] = None
        else:
            kwargs["default"] = list(default) if isinstance(default, tuple) else default
        option = (flags or {}).get(f.name, flag_name(f.name))
        parser.add_argument(option, dest=f.name, help=docs[f.name] + shown, **kwargs)
        added.append(f.name)
    return added


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of the dataclass `cls` from the parsed options that name its fields (others keep defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        annotation, _ = _unwrap_optional(hints[name])
        if isinstance(value, list) and (get_origin(annotation) is tuple or annotation is tuple):
            values[name] = tuple(value)
    values.update(overrides)
    return cls(**values)
