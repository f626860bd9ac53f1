"""Static pruning methods as thin wrappers over ``torch.nn.utils.prune``, one registered function each.

Every method takes a *total* target sparsity: a float for all eligible layers, or a mapping
``{layer name: fraction}``. Calling a method again with a higher target prunes only the difference
(``torch.nn.utils.prune`` stacks masks in a ``PruningContainer``), so an iterative schedule is a
sequence of calls, and each layer ends at exactly ``round(fraction * units)`` pruned units.

- unstructured (units = weights of every Conv2d / Linear): ``l1_unstructured``,
  ``random_unstructured`` (per layer), ``global_l1_unstructured``, ``global_random_unstructured``;
- structured (units = output channels of each ``ChannelGroup`` producer, see ``groups.py``):
  ``l1_structured``, ``l2_structured`` (Ln-norm filter pruning, dim 0), ``random_structured``.
  Structured methods also mask the coupled bias and BatchNorm affine parameters, so a pruned channel
  outputs exactly zero and ``remove_channels`` can drop it without changing the outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from dynprune.registry import Registry
from dynprune.static.groups import channel_groups

Amount = float | Mapping[str, float]
PRUNERS: Registry[None] = Registry("pruning method")
register_pruner = PRUNERS.register


def prune_model(model: nn.Module, method: str, amount: Amount) -> nn.Module:
    """Prune ``model`` in place with registered ``method`` up to total sparsity ``amount``; returns it."""
    PRUNERS.get(method)(model, amount)
    return model


def list_pruners() -> list[str]:
    """Names of every registered pruning method."""
    return PRUNERS.names()


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d / Linear of ``model`` by name: the layers unstructured methods prune."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _targets(eligible: Mapping[str, nn.Module], amount: Amount) -> dict[str, tuple[nn.Module, float]]:
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


def _per_layer_unstructured(fn: Callable[..., nn.Module], model: nn.Module, amount: Amount) -> None:
    for name, (m, frac) in _targets(weight_layers(model), amount).items():
        fn(m, "weight", amount=_extra(_zeros(m), m.weight.numel(), frac, name))


def _global_unstructured(method: type[prune.BasePruningMethod], model: nn.Module, amount: Amount) -> None:
    if isinstance(amount, Mapping):
        raise ValueError("global pruning takes one float amount, not a per-layer mapping")
    layers = _targets(weight_layers(model), amount)
    total = sum(m.weight.numel() for m, _ in layers.values())
    already = sum(_zeros(m) for m, _ in layers.values())
    prune.global_unstructured(
        [(m, "weight") for m, _ in layers.values()], method, amount=_extra(already, total, float(amount), "model")
    )


def _channel_keep(module: nn.Module) -> Tensor:
    """(C_out,) float mask of the output channels left by structured pruning of ``module.weight``."""
    mask = getattr(module, "weight_mask", torch.ones_like(module.weight))
    return mask.flatten(1).amax(1)


def _structured(fn: Callable[..., nn.Module], model: nn.Module, amount: Amount) -> None:
    groups = {g.producer: g for g in channel_groups(model)}
    producers = {name: model.get_submodule(name) for name in groups}
    for name, (m, frac) in _targets(producers, amount).items():
        units = m.weight.shape[0]
        already = int((_channel_keep(m) == 0).sum())
        extra = _extra(already, units, frac, name)
        if extra + already >= units:
            raise ValueError(f"amount {frac} would prune all {units} channels of '{name}'")
        fn(m, "weight", amount=extra, dim=0)
        keep = _channel_keep(m)
        coupled = [(m, "bias")]
        if groups[name].norm is not None:
            norm = model.get_submodule(groups[name].norm)
            coupled += [(norm, "weight"), (norm, "bias")]
        for module, pname in coupled:
            if getattr(module, pname, None) is not None:
                prune.custom_from_mask(module, pname, keep)


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


def channel_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of all-zero output channels of each channel-group producer."""
    out = {}
    for g in channel_groups(model):
        w = model.get_submodule(g.producer).weight
        out[g.producer] = float((w.flatten(1).abs().amax(1) == 0).sum()) / w.shape[0]
    return out


register_pruner("l1_unstructured")(partial(_per_layer_unstructured, prune.l1_unstructured))
register_pruner("random_unstructured")(partial(_per_layer_unstructured, prune.random_unstructured))
register_pruner("global_l1_unstructured")(partial(_global_unstructured, prune.L1Unstructured))
register_pruner("global_random_unstructured")(partial(_global_unstructured, prune.RandomUnstructured))
register_pruner("l1_structured")(partial(_structured, partial(prune.ln_structured, n=1)))
register_pruner("l2_structured")(partial(_structured, partial(prune.ln_structured, n=2)))
register_pruner("random_structured")(partial(_structured, prune.random_structured))
