"""Module paths a user can hook, with output shapes from one dry forward."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from diffdissect.errors import LayerNotFoundError
from diffdissect.models.target import Target


@dataclass
class LayerInfo:
    path: str
    module_class: str
    shape: tuple[int, ...] | None  # output shape for one sample (no batch dim); None: did not run

    def to_json(self) -> dict:
        return {"path": self.path, "class": self.module_class, "shape": list(self.shape) if self.shape else None}


def module_paths(target: Target) -> list[str]:
    return [name for name, _ in target.denoiser.named_modules() if name]


def resolve_layers(target: Target, layers: list[str]) -> list[str]:
    """Check every requested module path (with its optional @input/@update/@text suffix, capture.streams);
    a wrong one gets the closest valid names."""
    from diffdissect.capture.streams import parse_layer

    if not layers:
        raise LayerNotFoundError("no layers requested; list the hookable ones with `diffdissect layers MODEL`.")
    valid = module_paths(target)
    known = set(valid)
    for spec in layers:
        layer = parse_layer(spec).module
        if layer not in known:
            close = difflib.get_close_matches(layer, valid, n=6, cutoff=0.4)
            close += [v for v in valid if v.startswith(layer + ".")][: max(0, 6 - len(close))]
            hint = f" Closest valid names: {', '.join(dict.fromkeys(close))}." if close else ""
            raise LayerNotFoundError(
                f"layer {layer!r} is not a module of {type(target.denoiser).__name__}."
                f"{hint} See all with `diffdissect layers {target.source}`."
            )
    if len(set(layers)) != len(layers):
        raise LayerNotFoundError(f"layers are listed more than once: {layers}")
    return list(layers)


@torch.no_grad()
def list_layers(
    target: Target,
    *,
    max_depth: int | None = 2,
    contains: str | None = None,
    t: int | None = None,
    include_silent: bool = False,
) -> list[LayerInfo]:
    """Hookable modules (up to `max_depth` dotted parts) with their output shapes, in execution order."""
    from diffdissect.capture.hooks import LayerRecorder

    paths = [
        p
        for p in module_paths(target)
        if (max_depth is None or p.count(".") < max_depth) and (contains is None or contains in p)
    ]
    modules = dict(target.denoiser.named_modules())
    # every module's output, and the text stream of the joint blocks among them (listed as path@text)
    recorder = LayerRecorder(
        target.denoiser, [*paths, *(p + "@text" for p in paths)], early_exit=False, on_missing_tensor="skip"
    )
    sample, timestep, cond = target.dry_inputs(t)
    with recorder:
        target.forward(sample, timestep, cond)
    order = {p: i for i, p in enumerate(recorder.order)}
    infos = [
        LayerInfo(p, type(modules[p]).__name__, tuple(recorder.outputs[p].shape[1:]) if p in recorder.outputs else None)
        for p in paths
    ]
    infos += [
        LayerInfo(p + "@text", type(modules[p]).__name__, tuple(recorder.outputs[p + "@text"].shape[1:]))
        for p in paths
        if p + "@text" in recorder.outputs
    ]
    if not include_silent:  # containers (ModuleList) never run themselves: nothing to hook
        infos = [info for info in infos if info.shape is not None]
    return sorted(infos, key=lambda info: order.get(info.path, len(order)))
