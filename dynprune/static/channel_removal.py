"""Physical channel removal: turn a structured-pruned model into a genuinely smaller dense model.

For every checked ``ChannelGroup`` (``dependency.py``, Torch-Pruning's ``DependencyGraph``) the root
channels whose producing parameters are all exactly zero (weight rows, biases, norm affine entries, as
structured pruning leaves them) are removed from the whole group. The result computes the same
function as the masked model (eval mode), which is checked before it is returned, with fewer FLOPs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from dynprune.flops import count_flops
from dynprune.static.dependency import (
    ChannelGroup,
    channel_groups,
    dependency_graph,
    fold_masks,
    input_shape_of,
    prune_group,
)
from dynprune.static.prune import Batch, channel_scores, mask_channels
from dynprune.static.shortcuts import ChannelPad, explicit_shortcuts, sync_shortcut_widths


def zero_channels(model: nn.Module, group: ChannelGroup) -> Tensor:
    """(C,) bool: root channels of ``group`` whose producing weight rows and biases are all zero."""
    zero = torch.ones(group.channels, dtype=torch.bool)
    for member in group.members:
        module = model.get_submodule(member.name)
        if isinstance(module, ChannelPad):
            zero[member.root_rows[module.src[member.rows].cpu() >= 0]] = False
            continue
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if p is not None:
                nonzero = (p.detach()[member.rows].reshape(len(member.rows), -1) != 0).any(1).cpu()
                zero[member.root_rows[nonzero]] = False
    return zero


def remove_channels(model: nn.Module, input_shape: Sequence[int] | None = None) -> nn.Module:
    """A smaller copy of ``model`` without its all-zero channel groups; ``model`` is not modified.

    ``input_shape`` (C, H, W) defaults to ``model.input_shape`` (set by ``dynprune.backbones.create``).
    """
    shape = input_shape_of(model, input_shape)
    small = fold_masks(model)
    groups = channel_groups(small, shape)
    zeros = {g.root: zero_channels(small, g) for g in groups}
    graph = dependency_graph(small, shape)
    for g in groups:
        zero = g.offsets(zeros[g.root])  # a grouped conv loses the same offsets in every block
        if zero.all():  # a zero-width layer is not a module; one zero channel changes nothing
            zero[0] = False
        if zero.any():
            prune_group(graph, small, g.root, g.expand(zero).nonzero().flatten().tolist())
    small.input_shape = shape
    _check_same_outputs(model, small, shape)
    return small


def _check_same_outputs(model: nn.Module, small: nn.Module, shape: tuple[int, ...]) -> None:
    """ValueError unless ``small`` maps a random (2, *shape) batch to ``model``'s outputs (eval mode)."""
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
    was_training = model.training
    with torch.no_grad():
        want, got = model.eval()(x), small.eval()(x)
    model.train(was_training)
    if want.shape != got.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
        raise ValueError(f"removing the zero channels of {type(model).__name__} changed its outputs "
                         f"(max difference {float((got - want).abs().max()) if want.shape == got.shape else 'shape'})")


def load_pruned_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load the state dict of a physically pruned copy of ``model``'s architecture into ``model``,
    shrinking each conv / linear / norm to the saved shapes first; returns ``model``."""
    explicit_shortcuts(model)
    for name, module in model.named_modules():
        shapes = {p: state_dict[f"{name}.{p}" if name else p].shape for p, _ in
                  [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
                  if (f"{name}.{p}" if name else p) in state_dict}
        for pname, new_shape in shapes.items():
            old = getattr(module, pname)
            if old.shape != new_shape:
                fresh = old.new_empty(new_shape)
                setattr(module, pname, nn.Parameter(fresh, old.requires_grad) if isinstance(old, nn.Parameter)
                        else fresh)
        _resize_attributes(module)
    model.load_state_dict(state_dict)
    return sync_shortcut_widths(model)


def _resize_attributes(module: nn.Module) -> None:
    """Set a layer's channel attributes from its (resized) weight / running stats."""
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        module.out_channels = module.weight.shape[0]
        module.groups = module.out_channels if depthwise else module.groups
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = module.running_mean.shape[0] if module.running_mean is not None \
            else module.weight.shape[0]


def fraction_for_flops(
    model: nn.Module, ratio: float, input_shape: Sequence[int] | None = None, criterion: str = "l1_structured",
    tol: float = 0.03, batch: Batch | None = None,
) -> dict[str, float]:
    """{group root: fraction of its channels} whose physically pruned ``model`` has 1/``ratio`` of its
    FLOPs within ``tol`` relative (see ``prune_to_flops``; ``model`` is not modified); pass it to
    ``prune_model(model, criterion, fractions)``. ValueError when no fractions get that close."""
    return _search(model, ratio, input_shape, criterion, tol, batch)[0]


def prune_to_flops(
    model: nn.Module, ratio: float, criterion: str = "l1_structured", input_shape: Sequence[int] | None = None,
    batch: Batch | None = None, tol: float = 0.03,
) -> nn.Module:
    """A physically thinner copy of a dense ``model`` with 1/``ratio`` of its FLOPs (FlopCounterMode, one
    (1, *input_shape) input) within ``tol`` relative: the static-pruning arm of a FLOPs-matched comparison.

    Every Torch-Pruning channel group (residual-coupled, grouped and depthwise convs included) is
    scored once by ``criterion`` (``list_criteria()``: ``l1_structured``, ``l2_structured``,
    ``group_norm``, ``taylor``, ``random_structured``), and loses its lowest-scored channels: the same
    fraction in every group, searched by bisection, with a few groups one channel (per conv group)
    further where that lands nearer the FLOPs target. ``batch`` ((N, *input_shape) inputs,
    (N,) labels) is needed by ``taylor``. ``input_shape`` (C, H, W) defaults to ``model.input_shape``.

    The result is a plain ``nn.Module`` (train it like any backbone, e.g. ``GatedClassifier(thin,
    gate=None)``) that computes what the masked model computes; ``thin.input_shape`` is set and
    ``thin.pruning_report`` holds ``criterion``, ``fractions`` ({group root: pruned fraction}),
    ``dense_flops``, ``flops`` and ``flops_ratio`` (= flops / dense_flops, the achieved 1/R). ``model`` is
    not modified. ValueError when 1/R is out of reach within ``tol``.
    """
    fractions, thin, dense, flops = _search(model, ratio, input_shape, criterion, tol, batch)
    thin.pruning_report = {"criterion": criterion, "fractions": fractions, "dense_flops": dense, "flops": flops,
                           "flops_ratio": flops / dense}
    return thin


def _search(
    model: nn.Module, ratio: float, input_shape: Sequence[int] | None, criterion: str, tol: float,
    batch: Batch | None, resolution: float = 1e-3,
) -> tuple[dict[str, float], nn.Module, int, int]:
    """({group root: pruned fraction}, thin model, dense FLOPs, thin FLOPs) near 1/ratio of the FLOPs.

    A configuration is the number of pruned offsets of each group. Bisection brackets the budget between
    two uniform fractions, then between the configurations on the path from one to the other that moves
    the differing groups one at a time (module order); if the nearest is still off by more than ``tol``,
    single-offset moves of any group (one more or one fewer) are taken greedily while they bring the
    FLOPs nearer.
    """
    if ratio <= 1:
        raise ValueError(f"ratio must be > 1, got {ratio}")
    if not 0 < tol < 1:
        raise ValueError(f"tol is a relative FLOPs tolerance in (0, 1), got {tol}")
    shape = input_shape_of(model, input_shape)
    model = explicit_shortcuts(copy.deepcopy(model))  # the caller's model keeps its modules
    dense = count_flops(model, shape)[0]
    budget = dense / ratio
    scores = channel_scores(model, criterion, shape, batch)
    groups = channel_groups(model, shape)
    thin: dict[tuple[int, ...], tuple[nn.Module, int]] = {}

    def flops_at(counts: tuple[int, ...]) -> int:
        if counts not in thin:
            amounts = {g.root: c / g.block for g, c in zip(groups, counts, strict=True)}
            small = remove_channels(mask_channels(copy.deepcopy(model), amounts, scores, shape), shape)
            thin[counts] = small, count_flops(small, shape)[0]
        return thin[counts][1]

    def uniform(fraction: float) -> tuple[int, ...]:
        return tuple(min(round(fraction * g.block), g.block - 1) for g in groups)

    def error(counts: tuple[int, ...]) -> float:
        return abs(flops_at(counts) / budget - 1)

    lo, hi = 0.0, 1.0
    if flops_at(uniform(hi)) > budget * (1 + tol):
        raise ValueError(f"pruning all but one channel (per conv group) of every channel group of "
                         f"{type(model).__name__} reduces its FLOPs {dense / flops_at(uniform(hi)):.2f}x, short of "
                         f"{ratio}x")
    while hi - lo > resolution:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if flops_at(uniform(mid)) <= budget else (mid, hi)
    low, high = uniform(lo), uniform(hi)
    moving = [i for i in range(len(groups)) if low[i] != high[i]]

    def moved(k: int) -> tuple[int, ...]:  # the first k differing groups (module order) at ``high``
        return tuple(high[i] if i in moving[:k] else low[i] for i in range(len(groups)))

    first, last = 0, len(moving)  # FLOPs fall along the path: bisect for the first step at or under budget
    while last - first > 1:
        mid = (first + last) // 2
        first, last = (first, mid) if flops_at(moved(mid)) <= budget else (mid, last)
    best = min((moved(first), moved(last)), key=error)
    while error(best) > tol:
        moves = [best[:i] + (best[i] + d,) + best[i + 1:] for i, g in enumerate(groups) for d in (-1, 1)
                 if 0 <= best[i] + d < g.block]
        nearest = min(moves, key=error)
        if error(nearest) >= error(best):
            raise ValueError(f"no channel fractions found that reduce the FLOPs of {type(model).__name__} {ratio}x "
                             f"within {tol:.0%}: the nearest is {dense / flops_at(best):.3f}x")
        best = nearest
    fractions = {g.root: c / g.block for g, c in zip(groups, best, strict=True)}
    return fractions, thin[best][0], dense, flops_at(best)
