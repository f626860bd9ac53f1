"""Physical channel removal: turn a structured-pruned model into a genuinely smaller dense model.

For every ``ChannelGroup`` (see ``groups.py``) the output channels of the producer that are exactly
zero (weight row, bias and the following BatchNorm's affine entries all zero, as structured pruning
leaves them) are sliced out of the producer, the norm and the consumer's inputs. The result computes
the same function as the masked model (eval mode), with fewer FLOPs and a lower latency.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from dynprune.flops import count_flops
from dynprune.static.groups import ChannelGroup, channel_groups
from dynprune.static.prune import make_permanent, prune_model


def remove_channels(model: nn.Module) -> nn.Module:
    """A smaller copy of ``model`` without its all-zero output channels; ``model`` is not modified."""
    with torch.no_grad():
        for m in model.modules():  # masked tensors with autograd history cannot be deep-copied
            for hook in m._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    hook(m, None)
        small = make_permanent(copy.deepcopy(model))
        for group in channel_groups(small):
            _slice_group(small, group)
    return small


def _zero_units(module: nn.Module | None, keep: Tensor) -> Tensor:
    """Update ``keep`` (C,) bool: a unit stays when any of the module's per-unit parameters is non-zero."""
    if module is None:
        return keep
    for pname in ("weight", "bias"):
        p = getattr(module, pname, None)
        if p is not None:
            keep = keep | (p.detach().reshape(p.shape[0], -1) != 0).any(1)
    return keep


def _slice_group(model: nn.Module, group: ChannelGroup) -> None:
    """Drop the all-zero units of ``group.producer`` from it, its norm and its consumer, in place."""
    producer = model.get_submodule(group.producer)
    norm = model.get_submodule(group.norm) if group.norm else None
    consumer = model.get_submodule(group.consumer)
    units = producer.weight.shape[0]
    keep = _zero_units(norm, _zero_units(producer, torch.zeros(units, dtype=torch.bool)))
    if not keep.any():
        keep[0] = True  # a zero-width layer is not a module; one zero channel changes nothing
    idx = keep.nonzero().flatten()
    if len(idx) == units:
        return
    _take(producer, ("weight", "bias"), idx, dim=0)
    if isinstance(producer, nn.Conv2d):
        producer.out_channels = len(idx)
    else:
        producer.out_features = len(idx)
    if norm is not None:
        _take(norm, ("weight", "bias", "running_mean", "running_var"), idx, dim=0)
        norm.num_features = len(idx)
    inputs = (idx[:, None] * group.per_unit + torch.arange(group.per_unit)).flatten()
    _take(consumer, ("weight",), inputs, dim=1)
    if isinstance(consumer, nn.Conv2d):
        consumer.in_channels = len(inputs)
    else:
        consumer.in_features = len(inputs)


def _take(module: nn.Module, names: tuple[str, ...], idx: Tensor, dim: int) -> None:
    """Replace each named parameter / buffer of ``module`` by its ``index_select(dim, idx)``."""
    for name in names:
        t = getattr(module, name, None)
        if t is None:
            continue
        sliced = t.detach().index_select(dim, idx).clone()
        if isinstance(t, nn.Parameter):
            setattr(module, name, nn.Parameter(sliced, requires_grad=t.requires_grad))
        else:
            setattr(module, name, sliced)


def fraction_for_flops(
    model: nn.Module, ratio: float, input_shape: Sequence[int], method: str = "l1_structured", tol: float = 1e-3,
) -> float:
    """Smallest uniform per-group channel fraction whose physically pruned model has at most
    1/``ratio`` of ``model``'s FLOPs (bisection; ``model`` is not modified)."""
    if ratio <= 1:
        raise ValueError(f"ratio must be > 1, got {ratio}")
    budget = count_flops(model, tuple(input_shape))[0] / ratio

    def flops_at(fraction: float) -> int:
        return count_flops(remove_channels(prune_model(copy.deepcopy(model), method, fraction)), tuple(input_shape))[0]

    widths = [model.get_submodule(g.producer).weight.shape[0] for g in channel_groups(model)]
    lo, hi = 0.0, min((c - 1) / c for c in widths)  # every group keeps at least one channel
    if flops_at(hi) > budget:
        raise ValueError(f"pruning channel groups alone cannot reduce FLOPs by {ratio}x")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if flops_at(mid) <= budget else (mid, hi)
    return hi
