"""Data-flow trace of any nn.Module: which conv/linear feeds which, which BatchNorm normalises a
layer's raw output, which outputs reach a residual addition, and which modules are residual
branches or whole residual blocks.

One forward pass runs under a TorchFunctionMode that follows each layer's output through
channel-preserving ops (ReLU, pooling, flatten, reductions over other dims, ...) and counts every use of
every tensor. An addition is residual when its two operands derive from different module outputs (so an
activation's internal ``x + c * x**3`` is not). No source code is parsed, so it works on models the library
has never seen, including ones with Python control flow. Gates added by :func:`dynprune.gate_model` (children named
``dynprune_gate*``) are not traced.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

TRACED_TYPES = (nn.Conv2d, nn.Linear)
"""Layers the trace follows; transformers' ``Conv1D`` (GPT-2) is traced too, as a Linear (see :func:`is_linear`)."""
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
GATE_ATTR = "dynprune_gate"

# Ops after which a channel that was exactly zero is still exactly zero and stays in place.
_PRESERVING = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "silu", "gelu",
    "hardswish", "elu", "dropout", "dropout2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
    "adaptive_max_pool2d", "flatten", "view", "reshape", "contiguous", "clone", "mul", "__mul__",
}
# Reductions that keep the channels when the reduced dims leave them out (global pooling as ``x.mean((2, 3))``).
_REDUCING = {"mean", "sum", "amax", "amin"}
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
    channel_dim: int = 1

    @property
    def depthwise(self) -> bool:
        """True when each output channel reads exactly one input channel."""
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclass
class ModuleInfo:
    """What the trace learned about any module: shapes, calls and its place around residual additions.

    ``merges`` counts the residual additions executed inside the module; ``feeds_merge`` is True when
    its output goes straight into one; ``uses`` counts the ops and modules that consumed its output;
    ``takes_keep``: its forward takes a per-token ``keep`` mask (N, T) (a block that masks dropped tokens
    out of attention, DynamicViT style).
    """

    name: str
    order: int
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    calls: int = 0
    merges: int = 0
    feeds_merge: bool = False
    uses: int = 0
    identity: bool = False
    takes_keep: bool = False

    @property
    def branch(self) -> bool:
        """A residual branch: its output only feeds a residual addition (skipping it adds zeros)."""
        return self.feeds_merge and self.uses == 1 and not self.identity and self.calls == 1

    @property
    def whole_block(self) -> bool:
        """A whole residual block: it contains an addition and keeps its input's shape."""
        return self.merges >= 1 and self.calls == 1 and self.in_shape == self.out_shape


@dataclass
class Trace:
    """The layers (conv/linear) and all modules of a traced model, in call order."""

    layers: dict[str, LayerInfo]
    modules: dict[str, ModuleInfo]


class _FlowMode(TorchFunctionMode):
    """Propagates (source layer, raw) tags along tensors and counts tensor uses and merges."""

    def __init__(self, infos: dict[str, LayerInfo], modules: dict[str, ModuleInfo]) -> None:
        super().__init__()
        self.infos, self.modules = infos, modules
        self.tags: dict[int, tuple[str, bool]] = {}
        self.outputs: dict[int, str] = {}  # tensor id -> module whose output it is (last one wins)
        self.stack: list[str] = []
        self.alive: list[Tensor] = []  # keeps traced tensors alive so ids are not reused
        self.clock = 0

    def tag(self, t: Tensor, source: str, raw: bool) -> None:
        self.tags[id(t)] = (source, raw)
        self.alive.append(t)

    def tag_of(self, t: Any) -> tuple[str, bool] | None:
        return self.tags.get(id(t)) if isinstance(t, Tensor) else None

    def use(self, t: Any, merge: bool = False) -> None:
        """Record that an op (or a module) consumed tensor ``t``."""
        owner = self.outputs.get(id(t)) if isinstance(t, Tensor) else None
        if owner is not None:
            self.modules[owner].uses += 1
            self.modules[owner].feeds_merge |= merge

    def stamp(self, t: Tensor) -> None:
        """Mark ``t`` as the newest module output (see :func:`_stamp_of`)."""
        self.clock += 1
        setattr(t, _STAMP, self.clock)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        stamps = [s for a in _flat(args) if (s := _stamp_of(a)) is not None]
        if isinstance(out, Tensor) and stamps:
            setattr(out, _STAMP, max(stamps))
        # x + g(x) with no module call between them (GELU-tanh's x + 0.044715 x^3) is arithmetic, not a residual
        internal = name in _MERGING and len(stamps) == 2 and stamps[0] == stamps[1]
        merge = name in _MERGING and sum(isinstance(a, Tensor) for a in args) == 2 and not internal
        if merge:
            for module in self.stack:
                self.modules[module].merges += 1
        if name not in ("dim", "size", "__get__", "shape") and not name.startswith("_") or merge:
            for a in args:
                self.use(a, merge)
        sources = {tag[0] for a in args if (tag := self.tag_of(a)) is not None}
        if isinstance(out, Tensor) and id(out) in self.tags and name not in _PRESERVING:
            del self.tags[id(out)]  # an in-place op we cannot vouch for
        if not sources:
            return out
        if name in _MERGING and not internal:
            for source in sources:
                self.infos[source].residual = True
        elif len(sources) == 1 and isinstance(out, Tensor) and (
                name in _PRESERVING or name in _REDUCING and self.keeps_channels(sources, args, kwargs or {})):
            self.tag(out, sources.pop(), raw=False)
        return out

    def keeps_channels(self, sources: set[str], args: tuple, kwargs: dict) -> bool:
        """Whether a reduction over ``dim`` of the tagged input leaves its source layer's channels (and the batch)."""
        x, dims = args[0], kwargs.get("dim", args[1] if len(args) > 1 else None)
        if not isinstance(x, Tensor) or dims is None or isinstance(dims, str):
            return False
        dims = {d % x.dim() for d in ((dims,) if isinstance(dims, int) else dims)}
        channel = self.infos[next(iter(sources))].channel_dim % x.dim()
        return bool(dims) and 0 not in dims and channel not in dims


_STAMP = "_dynprune_stamp"


def _stamp_of(t: Any) -> int | None:
    """The call number of the latest module output a tensor derives from (None: from none, e.g. a parameter)."""
    return getattr(t, _STAMP, None) if isinstance(t, Tensor) else None


def _flat(args: tuple) -> list[Any]:
    """The arguments of an op, with those inside lists and tuples (``torch.cat([a, b])``)."""
    return [b for a in args for b in (a if isinstance(a, (list, tuple)) else (a,))]


def _traced_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules of ``model``, without the gates that dynprune added."""
    gate_paths = [n for n, _ in model.named_modules() if n.split(".")[-1].startswith(GATE_ATTR)]
    return [(n, m) for n, m in model.named_modules()
            if not any(n == g or n.startswith(g + ".") for g in gate_paths)]


def _takes_keep(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes a ``keep`` argument."""
    try:
        return "keep" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's layers): a Linear storing its weight (in, out)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor)
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a transformers ``Conv1D`` (both: last-dim in -> last-dim out)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of a Linear or of a transformers ``Conv1D`` (a transposed view of its (in, out))."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _traced(module: nn.Module) -> bool:
    return isinstance(module, TRACED_TYPES) or is_conv1d(module)


def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape[1:]) if isinstance(t, Tensor) else None


@torch.no_grad()
def trace_model(model: nn.Module, example: Tensor) -> Trace:
    """Run ``model(example)`` once in eval mode and return what every layer and module does."""
    infos: dict[str, LayerInfo] = {}
    modules: dict[str, ModuleInfo] = {}
    mode = _FlowMode(infos, modules)
    handles = []

    def pre_module(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            info = modules.get(name)
            if info is None:
                info = modules[name] = ModuleInfo(name, len(modules), takes_keep=_takes_keep(module))
            info.calls += 1
            info.in_shape = _shape(inputs[0]) if inputs else None
            if inputs:
                mode.use(inputs[0])
            mode.stack.append(name)
            if _traced(module):
                layer = infos.get(name)
                if layer is None:
                    conv = isinstance(module, nn.Conv2d)
                    cout, cin = (module.out_channels, module.in_channels) if conv else linear_weight(module).shape
                    layer = infos[name] = LayerInfo(name, len(infos), cin, cout, getattr(module, "groups", 1),
                                                    channel_dim=1 if conv else -1)
                layer.calls += 1
                tag = mode.tag_of(inputs[0])
                layer.producer = tag[0] if tag else None

        return hook

    def post_module(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            mode.stack.pop()
            info = modules[name]
            info.out_shape = _shape(output)
            info.identity = bool(inputs) and output is inputs[0]
            if isinstance(output, Tensor) and not info.identity:
                mode.outputs[id(output)] = name
                mode.alive.append(output)
                mode.stamp(output)
            if _traced(module):
                mode.tag(output, name, raw=True)
            elif isinstance(module, NORM_TYPES):
                tag = mode.tag_of(inputs[0])
                if tag is not None and tag[1] and infos[tag[0]].norm in (None, name):
                    infos[tag[0]].norm = name
                    mode.tag(output, tag[0], raw=False)

        return hook

    for name, module in _traced_modules(model):
        if name:
            handles.append(module.register_forward_pre_hook(pre_module(name)))
            handles.append(module.register_forward_hook(post_module(name)))
    was_training = model.training
    model.eval()
    try:
        with mode:
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return Trace(infos, modules)


def reaches_residual(layers: dict[str, LayerInfo], name: str) -> bool:
    """Whether layer ``name``'s output reaches a residual addition downstream, through the layers it feeds
    (then turning all its channels off skips a residual branch instead of cutting the network)."""

    def reaches(current: str, seen: frozenset[str]) -> bool:
        consumers = [i for i in layers.values() if i.producer == current and i.name not in seen]
        return any(c.residual or reaches(c.name, seen | {current}) for c in consumers)

    return name in layers and reaches(name, frozenset())


def trace_layers(model: nn.Module, example: Tensor) -> dict[str, LayerInfo]:
    """LayerInfo per conv/linear of ``model``, in call order (see :func:`trace_model`)."""
    return trace_model(model, example).layers
