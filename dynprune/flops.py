"""FLOPs: dense per-layer counts from ``torch.utils.flop_counter.FlopCounterMode`` and per-input
effective FLOPs of a gated model.

All numbers are FLOPs = 2 x MACs (FlopCounterMode's convention) for one input (batch 1).
A layer's effective FLOPs for input i are ``dense_l * keep_in_l(i) * keep_out_l(i) * scale_l(i)``
(see :class:`FlopsProfile`). Ops outside conv/linear layers (e.g. a functional matmul) are counted
densely unless a site scales the module holding them; the gates' own FLOPs are reported separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dynprune.trace import LayerInfo


def _embedding_bag_flops(weight: torch.Size, indices: torch.Size, *args: Any, out_shape: Any = None,
                         **kwargs: Any) -> int:
    """FLOPs of a sum-mode embedding bag: an add per gathered element, and a multiply too with per-sample
    weights (the runtime's sparse matrix-vector product: 2 x D per kept row)."""
    weights = args[4] if len(args) > 4 else kwargs.get("per_sample_weights")
    return (2 if weights is not None else 1) * indices.numel() * weight[1]


_AT = torch.ops.aten
SPARSE_FLOPS = {op: _embedding_bag_flops for op in (_AT.embedding_bag, _AT._embedding_bag,
                                                    _AT._embedding_bag_forward_only)}  # op packets: every overload
"""FLOP formulas for the ops the runtime runs that ``FlopCounterMode`` does not count by itself."""


def flop_counter(display: bool = False) -> FlopCounterMode:
    """``FlopCounterMode`` that also counts the runtime's sparse ops (:data:`SPARSE_FLOPS`): use it to count
    what a compiled model executes."""
    return FlopCounterMode(display=display, custom_mapping=SPARSE_FLOPS)


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...] | Tensor) -> tuple[int, dict[str, int]]:
    """Dense FLOPs of ``model`` on one input: (total, {module path: flops}).

    ``input_shape``: the shape of one float input, e.g. (C, H, W) (zeros are counted), or an example batch
    of one (any dtype, e.g. integer token ids (1, T)). Per-module counts include their children, as
    FlopCounterMode reports them.
    """
    example = example_input(input_shape, _device(model))
    was_training = model.training
    model.eval()
    try:
        with flop_counter() as counter:
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


def example_input(spec: tuple[int, ...] | Tensor, device: torch.device) -> Tensor:
    """One example batch: ``spec`` itself when it is a tensor, else float zeros of shape (1, *spec)."""
    if isinstance(spec, Tensor):
        return spec.to(device)
    return torch.zeros(1, *spec, device=device)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _times(a: Tensor, b: Tensor) -> Tensor:
    """a * b for per-input (N,) and per-position (N, T) factors, the per-input one broadcast over positions."""
    if a.dim() < b.dim():
        a = a[:, None]
    elif b.dim() < a.dim():
        b = b[:, None]
    return a * b


class FlopsSite(Protocol):
    """What the profile needs of a gated site (see :class:`dynprune.granularity.Site`)."""

    layers: tuple[str, ...]

    def flops_terms(self, mask: Tensor) -> Any: ...  # a dynprune.granularity.FlopsTerms

    def gate_reads(self, masks: dict[str, Tensor]) -> Tensor | None: ...


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

    A layer's effective FLOPs for input i = dense * keep_in(i) * keep_out(i) * scale(i): keep_out is the
    kept fraction of its own output-channel mask, keep_in that of the layer feeding it (a depthwise
    conv uses the per-channel product of both; masks per position (N, T, C) average over positions after
    the product), scale the product of the factors the sites give it (e.g. the decisions of the gated
    blocks that contain it). A site may also scale a module that is not a conv/linear layer (e.g. an
    attention core): its own FLOPs then leave ``other`` and become an entry of ``layers``. Masks and
    factors come from the sites (any granularity) via ``flops_terms``.
    """

    input_shape: tuple[int, ...]
    dense_total: int
    layers: list[LayerFlops]
    gate_flops: int = 0
    """The gates' own FLOPs when each reads its whole input (what the masked model runs)."""
    sites: dict[str, FlopsSite] = field(default_factory=dict)
    dependents: dict[str, list[str]] = field(default_factory=dict)
    modules: dict[str, int] = field(default_factory=dict)
    site_gates: dict[str, int] = field(default_factory=dict)
    """{site: its gate's FLOPs on its whole input} (part of ``gate_flops``)."""
    other: int = field(init=False)

    def __post_init__(self) -> None:
        self.other = self.dense_total - sum(layer.dense for layer in self.layers)

    @classmethod
    def build(cls, model: nn.Module, example: tuple[int, ...] | Tensor, infos: dict[str, LayerInfo]) -> FlopsProfile:
        """Count ``model`` (ungated, or with its gates switched off) densely, per traced layer, on one input
        (a shape or an example batch of one, see :func:`count_flops`)."""
        total, per_module = count_flops(model, example)
        layers = [LayerFlops(i.name, per_module.get(i.name, 0), i.producer, i.depthwise) for i in infos.values()]
        shape = tuple(example.shape[1:]) if isinstance(example, Tensor) else tuple(example)
        return cls(shape, total, layers, modules=per_module)

    def _own_flops(self, module: str) -> int:
        """FLOPs of ``module`` outside the traced layers in it."""
        inside = sum(lay.dense for lay in self.layers if lay.name.startswith(module + ".") or not module)
        return self.modules.get(module, 0) - inside

    def with_sites(self, sites: dict[str, FlopsSite], units: dict[str, int]) -> FlopsProfile:
        """The same dense profile, its effective FLOPs following ``sites`` ({name: site}, units per site)."""
        layers = [LayerFlops(lay.name, lay.dense, lay.producer, lay.depthwise) for lay in self.layers]
        profile = FlopsProfile(self.input_shape, self.dense_total, layers, self.gate_flops, dict(sites),
                               modules=self.modules)
        ones = {name: torch.ones(1, units[name]) for name in sites}
        terms = {name: site.flops_terms(ones[name]) for name, site in sites.items()}
        known = {lay.name for lay in profile.layers}
        extra = sorted({m for t in terms.values() for m in t.scale if m not in known})
        unknown = [m for m in extra if m not in self.modules]
        if unknown:
            raise ValueError(f"sites scale the FLOPs of {unknown}, which run no counted op")
        profile.layers += [LayerFlops(m, profile._own_flops(m), None, False) for m in extra]
        profile.other = profile.dense_total - sum(lay.dense for lay in profile.layers)
        out_masks, scales = profile._terms(ones)
        affected = set(out_masks) | set(scales)
        for layer in profile.layers:
            layer.gated = layer.name in affected
        for name, t in terms.items():
            consumers = {lay.name for lay in profile.layers if lay.producer in t.masks}
            changed = set(t.masks) | consumers | set(t.scale) | set(sites[name].layers)
            profile.dependents[name] = [lay.name for lay in profile.layers if lay.name in changed]  # a fixed order
        return profile

    def _terms(self, masks: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """({layer: output-channel mask (N, C)}, {module: product of its scale factors (N,)}) from site decisions."""
        out_masks: dict[str, Tensor] = {}
        scales: dict[str, Tensor] = {}
        for name, site in self.sites.items():
            terms = site.flops_terms(masks[name])
            out_masks.update(terms.masks)
            for module, factor in terms.scale.items():
                scales[module] = scales[module] * factor if module in scales else factor
        return out_masks, scales

    def per_layer(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Effective FLOPs per layer and input, {name: (N,)}; differentiable through the masks.

        ``masks``: {site name: decisions (N, units)}, as :func:`dynprune.collect_masks` returns them.
        """
        first = next(iter(masks.values()))
        batch, device = first.shape[0], first.device
        out_masks, scales = self._terms(masks)
        out = {}
        for layer in self.layers:
            keep_out = out_masks.get(layer.name)
            keep_in = out_masks.get(layer.producer) if layer.producer else None
            if layer.depthwise and keep_in is not None and keep_out is not None:
                keep = (keep_in * keep_out).mean(dim=-1)
            else:
                keep = torch.ones(batch, device=device)
                for m in (keep_in, keep_out):
                    if m is not None:
                        keep = _times(keep, m.mean(dim=-1))
            if keep.dim() > 1:  # per position: the mean over positions of the per-position keep
                keep = keep.flatten(1).mean(1)
            if layer.name in scales:
                keep = keep * scales[layer.name]
            out[layer.name] = layer.dense * keep
        return out

    def site_costs(self, per_layer: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each site's own share of the cost per input, {site: (N,)}: the effective FLOPs of the layers
        its decisions change, over the dense total (the per-layer credit of a REINFORCE gate); zeros for a site
        whose decisions change no counted FLOPs."""
        zeros = torch.zeros_like(next(iter(per_layer.values())))
        return {name: sum((per_layer[lay] for lay in self.dependents[name]), zeros) / self.dense_total
                for name in self.sites}

    def total(self, per_layer: dict[str, Tensor]) -> Tensor:
        """Backbone FLOPs per input (N,) from :meth:`per_layer`'s result (plus the ungated rest)."""
        return sum(per_layer.values()) + self.other

    def effective(self, masks: dict[str, Tensor]) -> Tensor:
        """Effective backbone FLOPs per input (N,), excluding the gates' own FLOPs."""
        return self.total(self.per_layer(masks))

    def gates(self, masks: dict[str, Tensor]) -> Tensor:
        """The gates' own FLOPs per input (N,): each site's gate on the part of its input it reads (e.g. a token
        gate on the tokens still kept, as the compiled model runs it), the rest of ``gate_flops`` as counted."""
        first = next(iter(masks.values()))
        total = torch.full((first.shape[0],), float(self.gate_flops), device=first.device)
        for name, flops in self.site_gates.items():
            reads = self.sites[name].gate_reads(masks)
            if reads is not None:
                total = total - flops * (1 - reads)
        return total

    def ratio(self, masks: dict[str, Tensor]) -> Tensor:
        """Effective backbone FLOPs / dense backbone FLOPs, per input (N,)."""
        return self.effective(masks) / self.dense_total
