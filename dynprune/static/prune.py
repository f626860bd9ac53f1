"""Static pruning methods as thin wrappers over ``torch.nn.utils.prune``, one registered function each.

Every method takes a *total* target sparsity: a float for all eligible layers, or a mapping
``{layer name: fraction}``. Calling a method again with a higher target prunes only the difference
(``torch.nn.utils.prune`` stacks masks in a ``PruningContainer``), so an iterative schedule is a
sequence of calls, and each layer ends at exactly ``round(fraction * units)`` pruned units.

- unstructured (units = weights of every Conv2d / Linear): ``l1_unstructured``,
  ``random_unstructured`` (per layer), ``global_l1_unstructured``, ``global_random_unstructured``;
- structured (units = output channels of each ``ChannelGroup`` root, see ``dependency.py``; amounts
  by root name): ``l1_structured``, ``l2_structured`` (Ln norm of the root's filters, Li et al.),
  ``random_structured``, and ``group_norm`` (Torch-Pruning's group L2-norm importance over every
  coupled parameter). Structured methods mask every producing parameter of a group (weight rows, bias,
  norm affine), so a pruned channel outputs exactly zero and ``remove_channels`` can drop it without
  changing the outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cache, partial
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import prune

from dynprune.registry import Registry
from dynprune.static.dependency import ChannelGroup, channel_groups, dependency_graph, input_shape_of

Amount = float | Mapping[str, float]
PRUNERS: Registry[None] = Registry("pruning method")
register_pruner = PRUNERS.register


def prune_model(
    model: nn.Module, method: str, amount: Amount, input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Prune ``model`` in place with registered ``method`` up to total sparsity ``amount``; returns it.

    Structured methods trace the model on one (1, *input_shape) input; ``input_shape`` defaults to
    ``model.input_shape`` (set by ``dynprune.backbones.create``).
    """
    PRUNERS.get(method)(model, amount, input_shape)
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


def _per_layer_unstructured(fn: Callable[..., nn.Module], model: nn.Module, amount: Amount, _: object) -> None:
    for name, (m, frac) in _targets(weight_layers(model), amount).items():
        fn(m, "weight", amount=_extra(_zeros(m), m.weight.numel(), frac, name))


def _global_unstructured(
    method: type[prune.BasePruningMethod], model: nn.Module, amount: Amount, _: object,
) -> None:
    if isinstance(amount, Mapping):
        raise ValueError("global pruning takes one float amount, not a per-layer mapping")
    layers = _targets(weight_layers(model), amount)
    total = sum(m.weight.numel() for m, _ in layers.values())
    already = sum(_zeros(m) for m, _ in layers.values())
    prune.global_unstructured(
        [(m, "weight") for m, _ in layers.values()], method, amount=_extra(already, total, float(amount), "model")
    )


Score = Callable[[nn.Module, ChannelGroup, Callable[[], tp.DependencyGraph]], Tensor]


def pruned_channels(model: nn.Module, group: ChannelGroup) -> Tensor:
    """(C,) bool: root channels of ``group`` whose filter (root weight row, masks applied) is all zero."""
    rows = model.get_submodule(group.root).weight.detach()
    return (rows.reshape(group.channels, -1) == 0).all(1).cpu()


def _structured(score: Score, model: nn.Module, amount: Amount, input_shape: Sequence[int] | None) -> None:
    """Mask the lowest-``score`` channels of each group up to its fraction (already pruned ones stay)."""
    shape = input_shape_of(model, input_shape)
    groups = {g.root: g for g in channel_groups(model, shape)}
    graph = cache(partial(dependency_graph, model, shape))  # traced once, only when a score needs it
    for name, (group, frac) in _targets(groups, amount).items():
        pruned = pruned_channels(model, group)
        already = int(pruned.sum())
        extra = _extra(already, group.channels, frac, name)
        if extra + already >= group.channels:
            raise ValueError(f"amount {frac} would prune all {group.channels} channels of '{name}'")
        scores = score(model, group, graph).detach().float().cpu().masked_fill(pruned, float("inf"))
        pruned[scores.argsort()[:extra]] = True
        for member, rows in group.member_rows(pruned).items():
            module = model.get_submodule(member)
            for pname in ("weight", "bias"):
                if getattr(module, pname, None) is not None:
                    mask = torch.ones_like(getattr(module, pname))
                    mask[rows] = 0
                    prune.custom_from_mask(module, pname, mask)


def _filter_norm(p: int, model: nn.Module, group: ChannelGroup, _: object) -> Tensor:
    """(C,) Lp norm of each filter of the group's root (Li et al.'s filter pruning for p = 1)."""
    return model.get_submodule(group.root).weight.reshape(group.channels, -1).norm(p=p, dim=1)


def _random_score(model: nn.Module, group: ChannelGroup, _: object) -> Tensor:
    """(C,) uniform random scores from the global torch RNG."""
    return torch.rand(group.channels)


def _group_norm(model: nn.Module, group: ChannelGroup, traced: Callable[[], tp.DependencyGraph]) -> Tensor:
    """(C,) Torch-Pruning's group L2-norm importance: every coupled parameter of a channel, mean-reduced."""
    graph = traced()
    root = model.get_submodule(group.root)
    tp_group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels,
                                       list(range(group.channels)))
    return tp.importance.GroupMagnitudeImportance(p=2)(tp_group)


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
register_pruner("l1_structured")(partial(_structured, partial(_filter_norm, 1)))
register_pruner("l2_structured")(partial(_structured, partial(_filter_norm, 2)))
register_pruner("random_structured")(partial(_structured, _random_score))
register_pruner("group_norm")(partial(_structured, _group_norm))
