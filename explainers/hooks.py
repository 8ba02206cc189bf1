"""Finding layers by name and recording their outputs with forward hooks that are always removed."""
from __future__ import annotations

import difflib
from typing import Iterable

import torch
from torch import nn

from explainers.errors import LayerNotFoundError

SPATIAL_TYPES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                 nn.BatchNorm2d, nn.Sequential)


def layer_names(model: nn.Module, spatial_only: bool = True) -> list[str]:
    """Names usable as target layers. With `spatial_only`, conv/pool/norm layers and blocks
    (modules that contain a conv), which is what CAM methods and activation maps accept."""
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if not spatial_only or isinstance(module, SPATIAL_TYPES) or any(
                isinstance(m, nn.Conv2d) for m in module.modules()):
            names.append(name)
    return names


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`; a clear error listing close and valid names otherwise."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    valid = layer_names(model)
    close = difflib.get_close_matches(name or "", valid, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    shown = valid if len(valid) <= 60 else valid[:30] + ["..."] + valid[-30:]
    raise LayerNotFoundError(f"unknown layer {name!r}.{hint} Valid layers ({len(valid)}): {', '.join(shown)}")


class LayerRecorder:
    """Context manager recording the outputs of named layers during forward passes.

    Each hooked output is kept as recorded, and the model continues with a copy, so later
    in-place operations (``ReLU(inplace=True)``) cannot change what was recorded and gradients
    taken with ``torch.autograd.grad(score, recorder[name])`` stay correct. Hooks are removed on
    exit, also when the forward pass raises.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | str):
        self.model = model
        self.names = [names] if isinstance(names, str) else list(names)
        self.modules = {n: get_layer(model, n) for n in self.names}  # raises before any hook is placed
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def record(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returns {type(output).__name__}, not a tensor")
            self.outputs[name] = output
            return output.clone()
        return record

    def __enter__(self) -> "LayerRecorder":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise LayerNotFoundError(f"layer {name!r} was not run by the forward pass")
        return self.outputs[name]
