"""Applying edits while the pipeline samples: forward hooks at the edited layers, the step tracked by a
pre-hook on the denoiser, and the layer calibration that gives alpha its unit.

The hooks run inside the pipeline's own sampler, so scheduler, guidance and VAE decode are the
pipeline's. Under classifier-free guidance the denoiser sees both halves in one batch; `branch` edits
both (default), or only the conditional or the unconditional half. The step index counts distinct t
in call order (PNDM's warm-up calls the denoiser twice at one t: one step); a flow-matching model's step
is keyed by the training index of its sigma, as trajectories are (capture.trajectory).

A layer is a module path with the stream syntax of capture.streams: a joint block (SD3, FLUX) edits its
image stream, or its text stream with `@text`; edits act on outputs, so `@input` / `@update` are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from diffdissect.capture.hooks import LayerRecorder, output_tensor
from diffdissect.capture.layers import resolve_layers
from diffdissect.capture.streams import LayerSpec, is_joint, parse_layer
from diffdissect.capture.trajectory import _step_keys, _timestep_value
from diffdissect.errors import SpecError
from diffdissect.intervene.edits import Context, Edit, to_locations
from diffdissect.models.target import Target

BRANCHES = ("both", "cond", "uncond")


def replace_output_tensor(output: Any, new: torch.Tensor) -> Any:
    """`output` with its hidden-state tensor (the one :func:`output_tensor` finds) replaced by `new`."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, dict):
        for key, value in output.items():
            if output_tensor(value) is not None:
                output[key] = replace_output_tensor(value, new)
                return output
    if isinstance(output, (tuple, list)):
        items = list(output)
        for i, item in enumerate(items):
            if output_tensor(item) is not None:
                items[i] = replace_output_tensor(item, new)
                return type(output)(items) if isinstance(output, list) else tuple(items)
    raise TypeError(f"cannot put an edited tensor back into a {type(output).__name__}.")


@torch.no_grad()
def layer_shapes(target: Target, layers: list[str]) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of each layer, from one dry forward."""
    layers = resolve_layers(target, layers)
    sample, timestep, cond = target.dry_inputs()
    with LayerRecorder(target.denoiser, layers, early_exit=True) as recorder:
        outputs = recorder.run(target.forward, sample, timestep, cond)
    return {layer: tuple(outputs[layer].shape[1:]) for layer in layers}


def sampling_schedule(target: Target, steps: int) -> list[int] | None:
    """The training timesteps the pipeline's sampler visits for `steps` steps (distinct, in order), read from
    a copy of its scheduler; None when the scheduler needs more than the step count to say."""
    from diffdissect.models.levels import process_of

    if target.pipeline is None:
        raise SpecError("steering needs a full pipeline (model_index.json), not a bare denoiser.")
    if process_of(target.scheduler) == "flow":  # steps keyed by the training index of sigma: read in the run
        return None
    scheduler = copy.deepcopy(target.pipeline.scheduler)
    try:
        scheduler.set_timesteps(steps)
    except Exception:  # noqa: BLE001 - a flow scheduler that wants mu/sigmas: learn it from the first pass
        return None
    out: list[int] = []
    for t in scheduler.timesteps.tolist():
        t = round(float(t))
        if t not in out:
            out.append(t)
    return out


class Intervention:
    """Context manager: while active, the edits change their layers' outputs in every denoiser call.

    `alpha` and `scales` (the layer calibration norms) are read at each call, so one Intervention can
    serve several alphas (`set_alpha`). `record_norms=True` also collects per-location norms (calibration).
    """

    def __init__(
        self,
        target: Target,
        edits: Sequence[Edit],
        *,
        scales: dict[str, float] | None = None,
        alpha: float = 0.0,
        branch: str = "both",
        record_norms: Sequence[str] = (),
    ):
        if branch not in BRANCHES:
            raise SpecError(f"branch must be one of {BRANCHES}, not {branch!r}.")
        self.target, self.edits, self.branch = target, list(edits), branch
        self.scales = dict(scales or {})
        self.alpha = float(alpha)
        self.layers = list(dict.fromkeys([e.layer for e in self.edits] + list(record_norms)))
        if self.layers:
            resolve_layers(target, self.layers)
        self.specs = [parse_layer(layer) for layer in self.layers]
        for spec in self.specs:
            if spec.what != "output":
                raise SpecError(
                    f"layer {spec.name!r}: edits act on a module's output; drop '@{spec.what}' (an "
                    "edit of the output of the module before is an edit of this one's input)."
                )
        from diffdissect.models.levels import process_of

        self._flow = process_of(target.scheduler) == "flow"
        self.record = set(record_norms)
        self.norms: dict[str, list[torch.Tensor]] = {layer: [] for layer in record_norms}
        self.seen_t: list[int] = []
        self.samples: int | None = None  # samples per pipeline call (set by the runner): finds the CFG halves
        self.calls = 0
        self._step_of: dict[int, int] = {}
        self._handles: list[Any] = []
        missing = [e.layer for e in self.edits if e.uses_alpha and e.layer not in self.scales]
        if missing:
            raise SpecError(f"no calibration norm for layer(s) {sorted(set(missing))}; calibrate first.")

    def set_alpha(self, alpha: float) -> None:
        self.alpha = float(alpha)

    def __enter__(self) -> Intervention:
        self._handles.append(self.target.denoiser.register_forward_pre_hook(self._pre, with_kwargs=True))
        modules = dict(self.target.denoiser.named_modules())
        by_module: dict[str, list[LayerSpec]] = {}
        for spec in self.specs:
            by_module.setdefault(spec.module, []).append(spec)
        for name, specs in by_module.items():
            self._handles.append(modules[name].register_forward_hook(self._hook(specs), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget the steps seen (call between pipeline runs)."""
        self._step_of.clear()
        self.seen_t.clear()

    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        value = _timestep_value(args, kwargs)  # the argument as handed over: DDPM family t; flow: see _step_keys
        t = _step_keys(self.target, [value])[0][0] if self._flow else int(round(value))
        self.calls += 1
        self.seen_t.append(t)
        if t not in self._step_of:
            self._step_of[t] = len(self._step_of)

    def _hook(self, specs: list[LayerSpec]):
        def hook(module: Any, args: Any, kwargs: dict, output: Any) -> Any:
            joint = is_joint(module, kwargs, output)
            changed = False
            for spec in specs:
                if joint:
                    index = 0 if spec.stream == "text" else 1
                    tensor = output[index]
                    if tensor is None:
                        raise SpecError(
                            f"layer {spec.name!r}: this {type(module).__name__} returns no text stream "
                            "(the last block of SD3 updates only the image tokens); edit its image stream."
                        )
                elif spec.stream == "text":
                    raise SpecError(
                        f"layer {spec.name!r}: {type(module).__name__} has no text stream; only joint "
                        "blocks have one. Drop '@text'."
                    )
                else:
                    tensor = output_tensor(output)
                    if tensor is None:
                        raise TypeError(
                            f"module {spec.module!r} returned {type(output).__name__} with no tensor in it."
                        )
                new = self._edit(spec.name, tensor)
                if new is not None:
                    if joint:
                        output = (*output[:index], new, *output[index + 1 :])
                    else:
                        output = replace_output_tensor(output, new)
                    changed = True
            return output if changed else None

        return hook

    def _edit(self, layer: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """The edited output tensor of `layer` in this call, or None when it is unchanged."""
        edits = [e for e in self.edits if e.layer == layer]
        if layer in self.record:
            h, _ = to_locations(tensor.detach())
            self.norms[layer].append(h.float().norm(dim=-1).flatten().cpu())
        if not edits:
            return None
        t = self.seen_t[-1] if self.seen_t else -1
        ctx = Context(step=self._step_of.get(t, 0), t=t, alpha=self.alpha, scale=self.scales.get(layer, 1.0))
        h, back = to_locations(tensor)
        part = self._part(h.shape[0])
        if part is False:
            return None
        sub = h if part is None else h[part]
        edited = sub
        for edit in edits:
            edited = edit.apply(edited, ctx)
        if edited is sub:
            return None
        if part is None:
            return back(edited)
        full = h.clone()
        full[part] = edited
        return back(full)

    def _part(self, batch: int) -> slice | None | bool:
        """Rows of the denoiser batch to edit: None for all, False for none."""
        if self.branch == "both":
            return None
        if self.samples is None or batch != 2 * self.samples:  # no guidance: every row is conditional
            return None if self.branch == "cond" else False
        half = batch // 2
        cond_first = self.target.cfg_cond_first
        first = (self.branch == "cond") == cond_first
        return slice(0, half) if first else slice(half, batch)

    def calibration(self) -> dict[str, float]:
        """The typical per-location norm of each recorded layer: the median over every location and call."""
        out = {}
        for layer, chunks in self.norms.items():
            if not chunks:
                raise SpecError(f"layer {layer!r} never ran during calibration.")
            out[layer] = float(torch.cat(chunks).median())
        return out
