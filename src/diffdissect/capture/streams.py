"""What is taken from a module: its output (default), its input or its residual update, of the image
stream (default) or the text stream of a joint block. One spelling for every command:

    up_blocks.0.attentions.1            the output
    up_blocks.0.attentions.1@input      the input (hidden_states)
    up_blocks.0.attentions.1@update     output - input (the block's residual update)
    transformer_blocks.3@text           a joint (MMDiT) block's text stream; @text@input, @text@update too

Joint blocks (SD3's JointTransformerBlock, FLUX's double- and single-stream blocks) are called with
`hidden_states` (image tokens) and `encoder_hidden_states` (text tokens) and return (text, image); their
"first tensor" is the text stream, so the image stream is taken explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from diffdissect.errors import SpecError
from diffdissect.models.families import JOINT_BLOCKS

SUFFIXES = {
    "": ("image", "output"),
    "@input": ("image", "input"),
    "@update": ("image", "update"),
    "@text": ("text", "output"),
    "@text@input": ("text", "input"),
    "@text@update": ("text", "update"),
}


@dataclass(frozen=True)
class LayerSpec:
    name: str  # as stored, e.g. "transformer_blocks.0@text@update"
    module: str  # the module path
    stream: Literal["image", "text"]
    what: Literal["output", "input", "update"]


def parse_layer(name: str) -> LayerSpec:
    module, sep, rest = name.partition("@")
    suffix = sep + rest
    if suffix not in SUFFIXES:
        raise SpecError(
            f"layer {name!r}: unknown suffix {suffix!r}; take a module's output (no suffix), "
            f"{', '.join(repr(s) for s in SUFFIXES if s)}."
        )
    stream, what = SUFFIXES[suffix]
    return LayerSpec(name=name, module=module, stream=stream, what=what)  # type: ignore[arg-type]


def output_tensor(output: Any) -> torch.Tensor | None:
    """The hidden-state tensor of a module's output: the tensor itself, or the first one in a tuple,
    list, dict or diffusers BaseOutput (down blocks return (hidden_states, residuals))."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # BaseOutput is an OrderedDict
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = output_tensor(item)
            if found is not None:
                return found
    return None


def is_joint(module: nn.Module, kwargs: dict[str, Any], output: Any) -> bool:
    """A joint block: image and text streams in, (text, image) out."""
    if type(module).__name__ in JOINT_BLOCKS:
        return True
    return (
        isinstance(output, tuple)
        and len(output) == 2
        and isinstance(output[1], torch.Tensor)
        and isinstance(kwargs.get("hidden_states"), torch.Tensor)
        and "encoder_hidden_states" in kwargs
        and output[1].shape == kwargs["hidden_states"].shape
    )


class NoStream(SpecError):
    """The requested stream or input does not exist for this module."""


def take(spec: LayerSpec, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> torch.Tensor:
    """The tensor `spec` asks for from one call of `module` (raises NoStream when there is none)."""
    joint = is_joint(module, kwargs, output)
    if spec.stream == "text":
        if not joint:
            raise NoStream(
                f"layer {spec.name!r}: {type(module).__name__} has no text stream; only joint blocks "
                f"({', '.join(sorted(JOINT_BLOCKS))}) have one. Drop '@text'."
            )
        out = output[0]
        inp = kwargs.get("encoder_hidden_states")
        if out is None:
            raise NoStream(
                f"layer {spec.name!r}: this {type(module).__name__} returns no text stream (the last "
                "block of SD3 updates only the image tokens); capture its image stream instead."
            )
    else:
        out = output[1] if joint else output_tensor(output)
        inp = kwargs.get("hidden_states")
        if inp is None:
            inp = args[0] if args else None
    if spec.what == "output":
        if not isinstance(out, torch.Tensor):
            raise NoStream(
                f"layer {spec.name!r}: {type(module).__name__} returned {type(output).__name__} with no tensor in it."
            )
        return out.detach()
    if not isinstance(inp, torch.Tensor):
        raise NoStream(f"layer {spec.name!r}: {type(module).__name__} was called without a tensor input to take.")
    if spec.what == "input":
        return inp.detach()
    if not isinstance(out, torch.Tensor) or out.shape != inp.shape:
        shape_out = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
        raise SpecError(
            f"layer {spec.name!r}: '@update' (output - input) needs a module whose output has its input's "
            f"shape, but {spec.module} maps {tuple(inp.shape[1:])} to {shape_out}. Capture its output "
            "or '@input' instead, or a sub-module that keeps the shape."
        )
    return (out - inp).detach()
