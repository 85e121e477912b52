"""Forward hooks that record module outputs (or inputs, updates, text streams: capture.streams), and stop
the forward pass once all are recorded."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from diffdissect.capture.streams import LayerSpec, NoStream, output_tensor, parse_layer, take

__all__ = ["LayerRecorder", "StopForward", "output_tensor"]


class StopForward(Exception):
    """Raised by the last hook to end the forward pass early (nothing after it needs computing)."""


class LayerRecorder:
    """Context manager: while active, what each layer spec names (a module path with an optional
    '@input', '@update', '@text' suffix) is kept in `outputs` for the module's first call.

    With `early_exit=True` the hook that completes the set raises :class:`StopForward`; call the
    model through :meth:`run` (or catch it yourself).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        *,
        early_exit: bool = True,
        on_missing_tensor: Literal["raise", "skip"] = "raise",
        keep_all_calls: bool = False,
    ):
        modules = dict(model.named_modules())
        self.specs = [parse_layer(name) for name in layers]
        self.modules = {spec.module: modules[spec.module] for spec in self.specs}
        self.by_module: dict[str, list[LayerSpec]] = {}
        for spec in self.specs:
            self.by_module.setdefault(spec.module, []).append(spec)
        self.early_exit = early_exit
        self.on_missing_tensor = on_missing_tensor
        self.keep_all_calls = keep_all_calls
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        self.order: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> LayerRecorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.outputs.clear()
        self.order.clear()
        for calls in self.calls.values():
            calls.clear()

    def run(self, fn, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Call `fn` (a forward) and return the recorded outputs, stopping early if allowed."""
        self.reset()
        try:
            fn(*args, **kwargs)
        except StopForward:
            pass
        missing = {spec.name for spec in self.specs} - set(self.outputs)
        if missing:
            raise RuntimeError(f"modules {sorted(missing)} did not run in the forward pass; they cannot be captured.")
        return dict(self.outputs)

    def _hook(self, name: str):
        specs = self.by_module[name]

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            for spec in specs:
                try:
                    tensor = take(spec, module, args, kwargs, output)
                except NoStream:
                    if self.on_missing_tensor == "raise":
                        raise
                    continue
                if self.keep_all_calls:
                    self.calls[spec.name].append(tensor)
                if spec.name not in self.outputs:
                    self.outputs[spec.name] = tensor
                    self.order.append(spec.name)
            if self.early_exit and len(self.outputs) == len(self.specs):
                raise StopForward

        return hook
