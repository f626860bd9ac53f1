"""Static pruning methods as thin wrappers over ``torch.nn.utils.prune``, one registered function each.

Every method takes a *total* target sparsity: a float for all eligible layers, or a mapping
``{layer name: fraction}``. Calling a method again with a higher target prunes only the difference
(``torch.nn.utils.prune`` stacks masks in a ``PruningContainer``), so an iterative schedule is a
sequence of calls, and each layer ends at exactly ``round(fraction * units)`` pruned units.

- unstructured (units = weights of every Conv2d / Linear): ``l1_unstructured``,
  ``random_unstructured`` (per layer), ``global_l1_unstructured``, ``global_random_unstructured``;
- structured (units = output channels of each ``ChannelGroup``, Torch-Pruning's dependency groups, see
  ``dependency.py``; amounts by root name), one per criterion, each a Torch-Pruning importance:
  ``l1_structured``, ``l2_structured`` (Ln norm of the root's filters, Li et al.), ``random_structured``,
  ``group_norm`` (group L2 norm over every coupled parameter) and ``taylor`` (first-order Taylor,
  Molchanov et al.; needs a labelled ``batch``). Structured methods mask every producing parameter of a
  group (weight rows, bias, norm affine), so a pruned channel outputs exactly zero and
  ``remove_channels`` can drop it without changing the outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import prune

from dynprune.registry import Registry
from dynprune.static.dependency import (
    ChannelGroup,
    channel_groups,
    dependency_graph,
    fold_masks,
    input_shape_of,
    tp_group,
)
from dynprune.static.shortcuts import zero_out_channels

Amount = float | Mapping[str, float]
Batch = tuple[Tensor, Tensor]
PRUNERS: Registry[None] = Registry("pruning method")
register_pruner = PRUNERS.register


def prune_model(
    model: nn.Module, method: str, amount: Amount, input_shape: Sequence[int] | None = None,
    batch: Batch | None = None,
) -> nn.Module:
    """Prune ``model`` in place with registered ``method`` up to total sparsity ``amount``; returns it.

    Structured methods trace the model on one (1, *input_shape) input; ``input_shape`` defaults to
    ``model.input_shape`` (set by ``dynprune.backbones.create``). ``batch`` ((N, *input_shape) inputs, (N,)
    labels) is read by gradient criteria (``taylor``) only.
    """
    PRUNERS.get(method)(model, amount, input_shape, batch)
    return model


def list_pruners() -> list[str]:
    """Names of every registered pruning method."""
    return PRUNERS.names()


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d / Linear of ``model`` by name: the layers unstructured methods prune."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _targets(eligible: Mapping[str, Any], amount: Amount) -> dict[str, tuple[Any, float]]:
    """Resolve ``amount`` to {name: (module, fraction)}, validating names and fractions."""
    wanted = dict(amount) if isinstance(amount, Mapping) else dict.fromkeys(eligible, amount)
    unknown = sorted(set(wanted) - set(eligible))
    if unknown:
        raise ValueError(f"cannot prune layer(s) {unknown}; choose from: {', '.join(eligible)}")
    for name, frac in wanted.items():
        if not 0.0 <= float(frac) < 1.0:
            raise ValueError(f"amount for '{name}' must be in [0, 1), got {frac}")
    return {name: (eligible[name], float(frac)) for name, frac in wanted.items()}


def _extra(already: int, total: int, frac: float, name: str) -> int:
    """Units still to prune to reach ``round(frac * total)``; sparsity never goes down."""
    target = round(frac * total)
    if target < already:
        raise ValueError(f"'{name}' already has {already}/{total} pruned, more than the {frac} asked")
    return target - already


def _zeros(module: nn.Module) -> int:
    """Number of weights currently masked (or zero) in ``module.weight``."""
    mask = getattr(module, "weight_mask", None)
    return int((mask == 0).sum()) if mask is not None else 0


def _per_layer_unstructured(fn: Callable[..., nn.Module], model: nn.Module, amount: Amount, *_: object) -> None:
    for name, (m, frac) in _targets(weight_layers(model), amount).items():
        fn(m, "weight", amount=_extra(_zeros(m), m.weight.numel(), frac, name))


def _global_unstructured(
    method: type[prune.BasePruningMethod], model: nn.Module, amount: Amount, *_: object,
) -> None:
    if isinstance(amount, Mapping):
        raise ValueError("global pruning takes one float amount, not a per-layer mapping")
    layers = _targets(weight_layers(model), amount)
    total = sum(m.weight.numel() for m, _ in layers.values())
    already = sum(_zeros(m) for m, _ in layers.values())
    prune.global_unstructured(
        [(m, "weight") for m, _ in layers.values()], method, amount=_extra(already, total, float(amount), "model")
    )


CRITERIA: Registry[tp.importance.Importance] = Registry("structured criterion")
_NEEDS_BATCH: set[str] = set()


def register_criterion(name: str, needs_batch: bool = False) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register a factory of a Torch-Pruning ``Importance`` as criterion *and* structured method ``name``;
    ``needs_batch``: it scores with gradients of the loss on a labelled batch (``prune_model(batch=...)``)."""

    def deco(factory: Callable[[], Any]) -> Callable[[], Any]:
        CRITERIA.register(name)(factory)
        PRUNERS.register(name)(partial(_structured, name))
        if needs_batch:
            _NEEDS_BATCH.add(name)
        return factory

    return deco


def list_criteria() -> list[str]:
    """Names of the structured (channel) criteria, which are also pruning methods."""
    return CRITERIA.names()


def pruned_channels(model: nn.Module, group: ChannelGroup) -> Tensor:
    """(C,) bool: root channels of ``group`` whose filter (root weight row, masks applied) is all zero."""
    rows = model.get_submodule(group.root).weight.detach()
    return (rows.reshape(group.channels, -1) == 0).all(1).cpu()


def channel_scores(
    model: nn.Module, criterion: str, input_shape: Sequence[int] | None = None, batch: Batch | None = None,
) -> dict[str, Tensor]:
    """{group root: (C,) importance of its channels} by Torch-Pruning's importance ``criterion``, computed
    on a copy of ``model`` with its masks folded (eval mode); ``batch`` ((N, *input_shape) inputs, (N,)
    labels) gives the loss gradients that a gradient criterion (``taylor``) needs."""
    importance = CRITERIA.get(criterion)()
    if criterion in _NEEDS_BATCH and batch is None:
        raise ValueError(f"criterion '{criterion}' scores channels with loss gradients: pass batch=(inputs, labels)")
    shape = input_shape_of(model, input_shape)
    folded = fold_masks(model).eval()
    groups = channel_groups(folded, shape)
    if criterion in _NEEDS_BATCH:
        device = next(folded.parameters()).device
        with torch.enable_grad():
            F.cross_entropy(folded(batch[0].to(device)), batch[1].to(device)).backward()
    graph = dependency_graph(folded, shape)
    return {g.root: importance(tp_group(graph, folded, g.root, range(g.channels))).detach().float().cpu()
            for g in groups}


def mask_channels(
    model: nn.Module, amount: Amount, scores: Mapping[str, Tensor], input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Mask the lowest-``scores`` channels of each group up to its fraction ``amount`` (already pruned
    ones stay); a group split by grouped convs loses the same offsets, by mean score, in every block."""
    groups = {g.root: g for g in channel_groups(model, input_shape_of(model, input_shape))}
    for name, (group, frac) in _targets(groups, amount).items():
        pruned = group.offsets(pruned_channels(model, group))
        already = int(pruned.sum())
        extra = _extra(already, group.block, frac, name)
        if extra + already >= group.block:
            raise ValueError(f"amount {frac} would prune all {group.channels} channels of '{name}'")
        score = scores[name].reshape(group.conv_groups, group.block).mean(0).masked_fill(pruned, float("inf"))
        pruned[score.argsort()[:extra]] = True
        for member, rows in group.member_rows(group.expand(pruned)).items():
            module = model.get_submodule(member)
            if zero_out_channels(module, rows):  # a parameter-free shortcut: its channels are zero for good
                continue
            for pname in ("weight", "bias"):
                if getattr(module, pname, None) is not None:
                    mask = torch.ones_like(getattr(module, pname))
                    mask[rows] = 0
                    prune.custom_from_mask(module, pname, mask)
    return model


def _structured(criterion: str, model: nn.Module, amount: Amount, input_shape: Sequence[int] | None,
                batch: Batch | None) -> None:
    """Score every channel group with ``criterion``, then mask each group's lowest channels."""
    mask_channels(model, amount, channel_scores(model, criterion, input_shape, batch), input_shape)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every ``torch.nn.utils.prune`` mask into its parameter (``prune.remove``); returns ``model``."""
    for m in model.modules():
        names = [h._tensor_name for h in m._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
        for pname in names:
            prune.remove(m, pname)
    return model


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights of each Conv2d / Linear (masked or permanent)."""
    return {n: float((m.weight == 0).sum()) / m.weight.numel() for n, m in weight_layers(model).items()}


def global_sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over all Conv2d / Linear weights."""
    layers = weight_layers(model).values()
    return sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)


def channel_sparsity(model: nn.Module, input_shape: Sequence[int] | None = None) -> dict[str, float]:
    """Fraction of all-zero filters of each channel group's root."""
    return {g.root: float(pruned_channels(model, g).float().mean())
            for g in channel_groups(model, input_shape_of(model, input_shape))}


register_pruner("l1_unstructured")(partial(_per_layer_unstructured, prune.l1_unstructured))
register_pruner("random_unstructured")(partial(_per_layer_unstructured, prune.random_unstructured))
register_pruner("global_l1_unstructured")(partial(_global_unstructured, prune.L1Unstructured))
register_pruner("global_random_unstructured")(partial(_global_unstructured, prune.RandomUnstructured))
# Li et al.'s filter norms: the root layer's own filters ("first" member of the group)
register_criterion("l1_structured")(partial(tp.importance.GroupMagnitudeImportance, 1, "first", None))
register_criterion("l2_structured")(partial(tp.importance.GroupMagnitudeImportance, 2, "first", None))
register_criterion("random_structured")(tp.importance.RandomImportance)
# Torch-Pruning's group L2 norm: every coupled parameter of a channel (root rows, norms, consumers' inputs)
register_criterion("group_norm")(partial(tp.importance.GroupMagnitudeImportance, 2, "mean", None))
# Molchanov et al.'s first-order Taylor |w * dL/dw|, summed over the group
register_criterion("taylor", needs_batch=True)(partial(tp.importance.GroupTaylorImportance, "mean", None))
