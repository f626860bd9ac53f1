"""``gate_model``: add per-layer gates to ANY nn.Module without editing its source.

The model is traced once (:mod:`dynprune.trace`) to find every Conv2d/Linear, the BatchNorm that
normalises it, and which outputs feed a residual addition. Eligible layers are wrapped in a
:class:`GatedLayer`; their BatchNorm (if any) in a :class:`MaskAfter`, so gated channels are
exactly zero after normalisation.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynprune.flops import FlopsProfile, count_flops
from dynprune.gated import GatedLayer, MaskAfter
from dynprune.gates import Gate, create_gate
from dynprune.trace import LayerInfo, trace_layers


@dataclass
class GatingInfo:
    """What ``gate_model`` did; stored on the model as ``model.dynprune``."""

    gate: str
    gated: list[str]
    layers: dict[str, LayerInfo]
    flops: FlopsProfile
    bypassed: list[str]


def bypassed_layers(infos: dict[str, LayerInfo], names: Sequence[str]) -> list[str]:
    """Layers among ``names`` whose output reaches a residual addition downstream (through the layers
    it feeds): turning all their channels off skips a residual branch, it does not cut the network."""

    def reaches_residual(name: str, seen: frozenset[str] = frozenset()) -> bool:
        consumers = [i for i in infos.values() if i.producer == name and i.name not in seen]
        return any(c.residual or reaches_residual(c.name, seen | {name}) for c in consumers)

    return [n for n in names if reaches_residual(n)]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _select(infos: dict[str, LayerInfo], where: Sequence[str] | None, skip_first: bool,
            skip_last: bool) -> list[str]:
    """Names of layers to gate: ``where`` patterns (fnmatch), else all but first and last."""
    ordered = sorted(infos.values(), key=lambda i: i.order)
    if where is not None:
        for pattern in where:
            if pattern in infos and infos[pattern].residual:
                raise ValueError(
                    f"layer '{pattern}' feeds a residual addition; gating its channels would not "
                    "skip them (the shortcut still fills them). Gate the block's inner layers instead."
                )
        unmatched = [p for p in where if not any(fnmatch.fnmatchcase(i.name, p) for i in ordered)]
        if unmatched:
            raise ValueError(f"where pattern(s) {unmatched} match no Conv2d/Linear; layers are: "
                             f"{[i.name for i in ordered]}")
        chosen = [i for i in ordered if any(fnmatch.fnmatchcase(i.name, p) for p in where)]
    else:
        chosen = ordered[1 if skip_first else 0 : len(ordered) - 1 if skip_last else None]
    return [i.name for i in chosen if not i.residual and i.calls == 1 and i.out_channels > 1]


def gate_model(
    model: nn.Module,
    gate: str = "sigmoid",
    where: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    skip_first: bool = True,
    skip_last: bool = True,
    **gate_kwargs: float,
) -> nn.Module:
    """Wrap the eligible conv/linear layers of ``model`` with gates of family ``gate`` (in place).

    Args:
        model: any nn.Module; ``input_shape`` (C, H, W) defaults to ``model.input_shape``.
        gate: a registered gate family (see ``dynprune.list_gates()``).
        where: module-name patterns (fnmatch) selecting the layers; default: every Conv2d/Linear
            except the first and the classifier (last) and those feeding a residual addition.
        gate_kwargs: passed to the gate, e.g. ``reduction=4, init_bias=3.0``.
    Returns:
        the same model, with ``model.dynprune`` (:class:`GatingInfo`) attached.
    """
    if hasattr(model, "dynprune"):
        raise ValueError("model is already gated (it has a `dynprune` attribute)")
    shape = tuple(input_shape or getattr(model, "input_shape", ()))
    if not shape:
        raise ValueError("pass input_shape=(C, H, W): the model has no `input_shape` attribute")
    example = torch.zeros(1, *shape, device=next(model.parameters()).device)
    try:
        infos = trace_layers(model, example)
    except RuntimeError as err:
        raise ValueError(f"model does not accept input of shape (N, {', '.join(map(str, shape))}): "
                         f"{err}") from err
    names = _select(infos, where, skip_first, skip_last)
    if not names:
        raise ValueError(f"no eligible Conv2d/Linear layers to gate (where={where}); layers: "
                         f"{list(infos)}")
    profile = FlopsProfile.build(model, shape, infos, set(names))
    for name in names:
        info, layer = infos[name], model.get_submodule(name)
        gate_net = create_gate(gate, info.in_channels, info.out_channels, **gate_kwargs)
        gate_net.to(example.device)
        gated = GatedLayer(layer, gate_net, mask_output=info.norm is None)
        _set_submodule(model, name, gated)
        if info.norm is not None:
            _set_submodule(model, info.norm, MaskAfter(model.get_submodule(info.norm), gated))
    gated_total, per_module = count_flops(model, shape)
    profile.gate_flops = sum(per_module.get(f"{n}.gate", 0) for n in names)
    if gated_total - profile.gate_flops != profile.dense_total:
        raise RuntimeError("FLOPs of the gated backbone differ from the dense count; please report")
    model.dynprune = GatingInfo(gate, names, infos, profile, bypassed_layers(infos, names))
    return model


def gating_info(model: nn.Module) -> GatingInfo:
    """The GatingInfo of a gated model, or a clear error for an ungated one."""
    info = getattr(model, "dynprune", None)
    if not isinstance(info, GatingInfo):
        raise ValueError("model is not gated; call dynprune.gate_model(model, gate=...) first")
    return info


def gated_layers(model: nn.Module) -> dict[str, GatedLayer]:
    """{layer name: GatedLayer} of a gated model, in call order."""
    return {name: model.get_submodule(name) for name in gating_info(model).gated}


def gates(model: nn.Module) -> list[Gate]:
    """The Gate modules of a gated model."""
    return [layer.gate for layer in gated_layers(model).values()]


def collect_masks(model: nn.Module) -> dict[str, Tensor]:
    """{layer name: mask (N, C_out)} from the last forward pass."""
    masks = {}
    for name, layer in gated_layers(model).items():
        if layer.mask is None:
            raise RuntimeError(f"gated layer '{name}' has no mask yet; run a forward pass first")
        masks[name] = layer.mask
    return masks
