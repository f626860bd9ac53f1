"""Turn a model into a slimmable supernet (``make_slimmable``) and pick its width (``set_width``).

The data-flow trace groups layers whose output channels must share a width: the outputs of layers
that reach a residual addition with the same channel count are merged (merging more than needed
is always valid, never less); a depthwise conv follows its producer; the last layer (the
classifier) keeps all its outputs and the first layer reads the full input. Width ``w`` runs each
group on its first ``ceil(w * C)`` channels, or on exactly the channel counts of a ``reference``
thin model built at width ``w``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dynprune.backbones.resnet_cifar import BasicBlock
from dynprune.slimmable.layers import SlimmableConv2d, SlimmableLinear, SwitchableBatchNorm2d
from dynprune.trace import LayerInfo, trace_layers

DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)
Reference = Callable[[float], nn.Module]


@dataclass
class SlimSpec:
    """What ``make_slimmable`` learned: layer groups, BN owners and the widths that have BN statistics."""

    widths: list[float]
    trained: int
    input_shape: tuple[int, ...]
    groups: dict[str, list[str]]
    full: dict[str, int]
    follows: dict[str, str]
    fixed: set[str]
    norms: dict[str, str]
    reference: Reference | None = None
    width: float = 1.0
    table: dict[float, dict[str, int]] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """Every slimmable layer, grouped or not."""
        return [n for members in self.groups.values() for n in members] + list(self.follows) + list(self.fixed)


@dataclass
class ThinBackbone:
    """A picklable ``reference``: ``ThinBackbone("mobilenetv2", {...})(w)`` builds the backbone at width_mult w."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, width: float) -> nn.Module:
        """The registered backbone ``name`` at ``width_mult=width``."""
        from dynprune.backbones import create

        return create(self.name, width_mult=width, **self.kwargs)


def spec_of(model: nn.Module) -> SlimSpec:
    """The SlimSpec of a model made by ``make_slimmable``."""
    spec = getattr(model, "slimmable", None)
    if not isinstance(spec, SlimSpec):
        raise ValueError(f"{type(model).__name__} is not slimmable; call make_slimmable(model) first")
    return spec


def _check_widths(widths: list[float]) -> list[float]:
    bad = [w for w in widths if not 0 < w <= 1]
    if not widths or bad:
        raise ValueError(f"widths must be a non-empty list of values in (0, 1], got {widths}")
    return sorted(set(float(w) for w in widths))


def _group(infos: dict[str, LayerInfo]) -> tuple[dict[str, list[str]], dict[str, str], set[str]]:
    """(groups of coupled layers, depthwise layer -> layer it follows, fixed layers)."""
    ordered = sorted(infos.values(), key=lambda i: i.order)
    fixed = {ordered[-1].name}
    follows: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    residual_group: dict[int, str] = {}
    for info in ordered:
        if info.name in fixed:
            continue
        if info.depthwise:
            if info.producer is None:
                raise ValueError(f"depthwise conv '{info.name}' has no traceable producer; cannot slim it")
            follows[info.name] = follows.get(info.producer, info.producer)
        elif info.residual and info.out_channels in residual_group:
            groups[residual_group[info.out_channels]].append(info.name)
        else:
            groups[info.name] = [info.name]
            if info.residual:
                residual_group[info.out_channels] = info.name
    if any(source in fixed for source in follows.values()):
        raise ValueError("a depthwise conv follows the classifier; cannot slim this model")
    return groups, follows, fixed


def _pad_shortcut(block: BasicBlock, inputs: tuple[Tensor, ...]) -> None:
    """Forward pre-hook: a zero-padding shortcut pads its input up to the block's active width."""
    out = block.conv2.out_active or block.conv2.out_channels
    block.pad = out - inputs[0].shape[1]


def make_slimmable(
    model: nn.Module, widths: list[float] | None = None, reference: Reference | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """Convert ``model`` in place into a supernet for ``widths`` (default 0.25/0.5/0.75/1.0) and return it.

    ``reference(w)`` (optional) builds the thin model of width ``w``; its per-layer channel counts
    (matched by layer name) then replace the ``ceil(w * C)`` rule, e.g. ``ThinBackbone("mobilenetv2")``.
    ``input_shape`` (C, H, W) defaults to ``model.input_shape``.
    """
    if hasattr(model, "slimmable"):
        raise ValueError("model is slimmable already")
    widths = _check_widths(list(DEFAULT_WIDTHS if widths is None else widths))
    shape = tuple(input_shape or getattr(model, "input_shape", ()))
    if not shape:
        raise ValueError("pass input_shape=(C, H, W): the model has no input_shape attribute")
    infos = trace_layers(model, torch.zeros(1, *shape, device=_device(model)))
    if not infos:
        raise ValueError("the model has no conv/linear layer to slim")
    groups, follows, fixed = _group(infos)
    norms = {info.norm: info.name for info in infos.values() if info.norm is not None}
    stray = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in norms]
    if stray:
        raise ValueError(f"BatchNorm layer(s) {stray} do not follow a conv/linear directly; cannot slim them")
    spec = SlimSpec(widths, len(widths), shape, groups, {n: i.out_channels for n, i in infos.items()},
                    follows, fixed, norms, reference)
    tables = [channels_at(spec, w) for w in widths]
    for name in infos:
        dense = model.get_submodule(name)
        slim = (SlimmableConv2d if isinstance(dense, nn.Conv2d) else SlimmableLinear).from_dense(dense)
        _replace(model, name, slim)
    for norm, layer in norms.items():
        _replace(model, norm, SwitchableBatchNorm2d.from_dense(model.get_submodule(norm),
                                                               [t[layer] for t in tables]))
    for module in model.modules():
        if isinstance(module, BasicBlock) and module.downsample is None and module.pad:
            module.register_forward_pre_hook(_pad_shortcut)
    model.slimmable = spec
    set_width(model, widths[-1])
    return model


def channels_at(spec: SlimSpec, width: float) -> dict[str, int]:
    """Output channels of every slimmable layer at ``width`` (cached in the spec)."""
    if width in spec.table:
        return spec.table[width]
    if spec.reference is not None:
        table = _reference_channels(spec, width)
    else:
        table = {n: spec.full[n] for n in spec.fixed}
        for members in spec.groups.values():
            size = max(1, math.ceil(round(width * spec.full[members[0]], 6)))
            table.update(dict.fromkeys(members, size))
        table.update({n: table[source] for n, source in spec.follows.items()})
    spec.table[width] = table
    return table


def _reference_channels(spec: SlimSpec, width: float) -> dict[str, int]:
    thin = spec.reference(width)
    infos = trace_layers(thin, torch.zeros(1, *spec.input_shape))
    missing = sorted(set(spec.layers) - set(infos))
    if missing:
        raise ValueError(f"the reference model at width {width} lacks layer(s) {missing[:5]}")
    table = {n: infos[n].out_channels for n in spec.layers}
    for n, size in table.items():
        if size > spec.full[n]:
            raise ValueError(f"the reference model at width {width} has {size} channels in '{n}', "
                             f"more than the supernet's {spec.full[n]}")
    for members in spec.groups.values():
        if len({table[n] for n in members}) > 1:
            raise ValueError(f"the reference model at width {width} gives coupled layers {members} "
                             f"different widths {[table[n] for n in members]}")
    return table


def set_width(model: nn.Module, width: float) -> nn.Module:
    """Run ``model`` at ``width`` from here on: one of its widths or a width calibrated with ``calibrate_bn``."""
    spec = spec_of(model)
    index = width_index(spec, width)
    table = channels_at(spec, width)
    for name in spec.layers:
        model.get_submodule(name).out_active = table[name]
    for norm in spec.norms:
        model.get_submodule(norm).active = index
    spec.width = width
    return model


def width_index(spec: SlimSpec, width: float) -> int:
    """Index of ``width``'s BatchNorms; a clear error for a width without statistics."""
    for i, known in enumerate(spec.widths):
        if math.isclose(known, width):
            return i
    raise ValueError(f"width {width} has no BatchNorm statistics; choose one of {spec.widths} "
                     f"or run calibrate_bn(model, {width}, loader) first")


@torch.no_grad()
def export_thin(model: nn.Module, width: float) -> dict[str, Tensor]:
    """State dict of the thin model equal to ``model`` at ``width`` (plain conv/linear/BN keys, sliced copies)."""
    spec = spec_of(model)
    previous, was_training = spec.width, model.training
    set_width(model, width)
    model.eval()
    try:
        model(torch.zeros(1, *spec.input_shape, device=_device(model)))
        state = {}
        for name, module in model.named_modules():
            if isinstance(module, (SlimmableConv2d, SlimmableLinear)):
                weight, bias = module.sliced(module.in_active)
                state[f"{name}.weight"] = weight.clone()
                if bias is not None:
                    state[f"{name}.bias"] = bias.clone()
            elif isinstance(module, SwitchableBatchNorm2d):
                bn_state = module.bns[module.active].state_dict()
                state.update({f"{name}.{k}": v.clone() for k, v in bn_state.items()})
    finally:
        set_width(model, previous)
        model.train(was_training)
    return state


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
