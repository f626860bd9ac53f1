"""FLOPs: dense per-layer counts from ``torch.utils.flop_counter.FlopCounterMode`` and per-input
effective FLOPs of a gated model.

All numbers are FLOPs = 2 x MACs (FlopCounterMode's convention) for one input (batch 1).
A layer's effective FLOPs for input i are ``dense_l * keep_in_l(i) * keep_out_l(i) * exec_l(i)``
(see :class:`FlopsProfile`). Ops outside conv/linear layers (e.g. a functional matmul) are counted
densely; the gates' own FLOPs are reported separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dynprune.trace import LayerInfo


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """Dense FLOPs of ``model`` on one input of shape (C, H, W): (total, {module path: flops}).

    Per-module counts include their children, as FlopCounterMode reports them.
    """
    example = torch.zeros(1, *input_shape, device=_device(model))
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    per_module = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        path = key.split(".", 1)[1] if "." in key else ""
        per_module[path] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class FlopsSite(Protocol):
    """What the profile needs of a gated site (see :class:`dynprune.granularity.Site`)."""

    layers: tuple[str, ...]

    def flops_terms(self, mask: Tensor) -> tuple[dict[str, Tensor], Tensor | None]: ...


@dataclass
class LayerFlops:
    """One conv/linear layer's dense FLOPs and what its effective FLOPs depend on."""

    name: str
    dense: int
    producer: str | None
    depthwise: bool
    gated: bool = False


@dataclass
class FlopsProfile:
    """Dense FLOPs of a backbone and the recipe for its per-input effective FLOPs.

    A layer's effective FLOPs for input i = dense * keep_in(i) * keep_out(i) * exec(i): keep_out is the
    kept fraction of its own output-channel mask, keep_in that of the layer feeding it (a depthwise
    conv uses the per-channel product of both), exec the product of the decisions of the gated blocks
    that contain it. Masks and decisions come from the sites (any granularity) via ``flops_terms``.
    """

    input_shape: tuple[int, ...]
    dense_total: int
    layers: list[LayerFlops]
    gate_flops: int = 0
    sites: dict[str, FlopsSite] = field(default_factory=dict)
    dependents: dict[str, set[str]] = field(default_factory=dict)
    other: int = field(init=False)

    def __post_init__(self) -> None:
        self.other = self.dense_total - sum(layer.dense for layer in self.layers)

    @classmethod
    def build(cls, model: nn.Module, input_shape: tuple[int, ...], infos: dict[str, LayerInfo]) -> FlopsProfile:
        """Count ``model`` (ungated, or with its gates switched off) densely, per traced layer."""
        total, per_module = count_flops(model, input_shape)
        layers = [LayerFlops(i.name, per_module.get(i.name, 0), i.producer, i.depthwise) for i in infos.values()]
        return cls(tuple(input_shape), total, layers)

    def with_sites(self, sites: dict[str, FlopsSite], units: dict[str, int]) -> FlopsProfile:
        """The same dense profile, its effective FLOPs following ``sites`` ({name: site}, units per site)."""
        profile = FlopsProfile(self.input_shape, self.dense_total,
                               [LayerFlops(lay.name, lay.dense, lay.producer, lay.depthwise) for lay in self.layers],
                               self.gate_flops, dict(sites))
        ones = {name: torch.ones(1, units[name]) for name in sites}
        out_masks, execs = profile._terms(ones)
        affected = set(out_masks) | set(execs)
        for layer in profile.layers:
            layer.gated = layer.name in affected
        for name, site in sites.items():
            masked, _ = site.flops_terms(ones[name])
            consumers = {lay.name for lay in profile.layers if lay.producer in masked}
            profile.dependents[name] = set(masked) | consumers | set(site.layers)
        return profile

    def _terms(self, masks: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """({layer: output-channel mask (N, C)}, {layer: execution factor (N,)}) from site decisions."""
        out_masks: dict[str, Tensor] = {}
        execs: dict[str, Tensor] = {}
        for name, site in self.sites.items():
            masked, factor = site.flops_terms(masks[name])
            out_masks.update(masked)
            if factor is not None:
                for layer in site.layers:
                    execs[layer] = execs[layer] * factor if layer in execs else factor
        return out_masks, execs

    def per_layer(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Effective FLOPs per layer and input, {name: (N,)}; differentiable through the masks.

        ``masks``: {site name: decisions (N, units)}, as :func:`dynprune.collect_masks` returns them.
        """
        first = next(iter(masks.values()))
        batch, device = first.shape[0], first.device
        out_masks, execs = self._terms(masks)
        out = {}
        for layer in self.layers:
            keep_out = out_masks.get(layer.name)
            keep_in = out_masks.get(layer.producer) if layer.producer else None
            if layer.depthwise and keep_in is not None and keep_out is not None:
                keep = (keep_in * keep_out).mean(dim=1)
            else:
                keep = torch.ones(batch, device=device)
                for m in (keep_in, keep_out):
                    if m is not None:
                        keep = keep * m.mean(dim=1)
            if layer.name in execs:
                keep = keep * execs[layer.name]
            out[layer.name] = layer.dense * keep
        return out

    def site_costs(self, per_layer: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each site's own share of the cost per input, {site: (N,)}: the effective FLOPs of the layers
        its decisions change, over the dense total (the per-layer credit of a REINFORCE gate)."""
        return {name: sum(per_layer[lay] for lay in self.dependents[name]) / self.dense_total for name in self.sites}

    def total(self, per_layer: dict[str, Tensor]) -> Tensor:
        """Backbone FLOPs per input (N,) from :meth:`per_layer`'s result (plus the ungated rest)."""
        return sum(per_layer.values()) + self.other

    def effective(self, masks: dict[str, Tensor]) -> Tensor:
        """Effective backbone FLOPs per input (N,), excluding the gates' own FLOPs."""
        return self.total(self.per_layer(masks))

    def ratio(self, masks: dict[str, Tensor]) -> Tensor:
        """Effective backbone FLOPs / dense backbone FLOPs, per input (N,)."""
        return self.effective(masks) / self.dense_total
