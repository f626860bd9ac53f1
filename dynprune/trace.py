"""Data-flow trace of any nn.Module: which conv/linear feeds which, which BatchNorm normalises a
layer's raw output, and which outputs reach a residual addition.

One forward pass runs under a TorchFunctionMode that follows each layer's output through
channel-preserving ops (ReLU, pooling, flatten, ...). No source code is parsed, so it works on
models the library has never seen, including ones with Python control flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

TRACED_TYPES = (nn.Conv2d, nn.Linear)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)

# Ops after which a channel that was exactly zero is still exactly zero and stays in place.
_PRESERVING = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "silu", "gelu",
    "hardswish", "elu", "dropout", "dropout2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
    "adaptive_max_pool2d", "flatten", "view", "reshape", "contiguous", "clone", "mul", "__mul__",
}
# Ops that merge two feature maps channel by channel: their inputs are residual-coupled.
_MERGING = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__"}


@dataclass
class LayerInfo:
    """What the trace learned about one conv/linear layer (named by its module path)."""

    name: str
    order: int
    in_channels: int
    out_channels: int
    groups: int = 1
    norm: str | None = None
    producer: str | None = None
    residual: bool = False
    calls: int = 0

    @property
    def depthwise(self) -> bool:
        """True when each output channel reads exactly one input channel."""
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels


class _FlowMode(TorchFunctionMode):
    """Propagates (source layer, raw) tags along tensors through channel-preserving ops."""

    def __init__(self, infos: dict[str, LayerInfo]) -> None:
        super().__init__()
        self.infos = infos
        self.tags: dict[int, tuple[str, bool]] = {}
        self.alive: list[Tensor] = []

    def tag(self, t: Tensor, source: str, raw: bool) -> None:
        self.tags[id(t)] = (source, raw)
        self.alive.append(t)

    def tag_of(self, t: Any) -> tuple[str, bool] | None:
        return self.tags.get(id(t)) if isinstance(t, Tensor) else None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        sources = {tag[0] for a in args if (tag := self.tag_of(a)) is not None}
        if isinstance(out, Tensor) and id(out) in self.tags and name not in _PRESERVING:
            del self.tags[id(out)]  # an in-place op we cannot vouch for
        if not sources:
            return out
        if name in _MERGING:
            for source in sources:
                self.infos[source].residual = True
        elif name in _PRESERVING and len(sources) == 1 and isinstance(out, Tensor):
            self.tag(out, sources.pop(), raw=False)
        return out


@torch.no_grad()
def trace_layers(model: nn.Module, example: Tensor) -> dict[str, LayerInfo]:
    """Run ``model(example)`` once in eval mode and return LayerInfo per conv/linear, in call order."""
    infos: dict[str, LayerInfo] = {}
    mode = _FlowMode(infos)
    handles = []

    def pre_layer(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            info = infos.get(name)
            if info is None:
                groups = getattr(module, "groups", 1)
                cin = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
                cout = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
                info = infos[name] = LayerInfo(name, len(infos), cin, cout, groups)
            info.calls += 1
            tag = mode.tag_of(inputs[0])
            info.producer = tag[0] if tag else None

        return hook

    def post_layer(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            mode.tag(output, name, raw=True)

        return hook

    def post_norm(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            tag = mode.tag_of(inputs[0])
            if tag is not None and tag[1] and infos[tag[0]].norm in (None, name):
                infos[tag[0]].norm = name
                mode.tag(output, tag[0], raw=False)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, TRACED_TYPES):
            handles.append(module.register_forward_pre_hook(pre_layer(name)))
            handles.append(module.register_forward_hook(post_layer(name)))
        elif isinstance(module, NORM_TYPES):
            handles.append(module.register_forward_hook(post_norm(name)))
    was_training = model.training
    model.eval()
    try:
        with mode:
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return infos
