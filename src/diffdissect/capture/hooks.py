"""Forward hooks that record module outputs, and stop the forward pass once all are recorded."""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn


class StopForward(Exception):
    """Raised by the last hook to end the forward pass early (nothing after it needs computing)."""


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


class LayerRecorder:
    """Context manager: while active, the first output of each named module is kept in `outputs`.

    With `early_exit=True` the hook that completes the set raises :class:`StopForward`; call the
    model through :meth:`run` (or catch it yourself).
    """

    def __init__(self, model: nn.Module, layers: list[str], *, early_exit: bool = True,
                 on_missing_tensor: Literal["raise", "skip"] = "raise", keep_all_calls: bool = False):
        modules = dict(model.named_modules())
        self.modules = {name: modules[name] for name in layers}
        self.early_exit = early_exit
        self.on_missing_tensor = on_missing_tensor
        self.keep_all_calls = keep_all_calls
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        self.order: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> LayerRecorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
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
        missing = set(self.modules) - set(self.outputs)
        if missing:
            raise RuntimeError(f"modules {sorted(missing)} did not run in the forward pass; they cannot be captured.")
        return dict(self.outputs)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = output_tensor(output)
            if tensor is None:
                if self.on_missing_tensor == "raise":
                    raise TypeError(f"module {name!r} returned {type(output).__name__} with no tensor in it.")
                return
            tensor = tensor.detach()
            if self.keep_all_calls:
                self.calls[name].append(tensor)
            if name not in self.outputs:
                self.outputs[name] = tensor
                self.order.append(name)
                if self.early_exit and len(self.outputs) == len(self.modules):
                    raise StopForward
        return hook
