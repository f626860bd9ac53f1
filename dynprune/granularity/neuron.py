"""Neuron granularity: per token, which hidden units of a transformer MLP run (the unit of Deja Vu, CATS, TEAL).

A site is an MLP's first Linear (``fc1``) on tokens (N, T, D) whose output reaches another Linear (``fc2``)
through zero-preserving ops only (GELU, ReLU, SiLU, dropout: a unit that is 0 stays 0). Its gate reads fc1's
input per token and decides (N, T, H) over the H hidden units; a unit that is off is exactly zero after the
activation, so it costs nothing in fc1's row and fc2's column: both layers' FLOPs scale with the kept fraction
of each token (the channel formula with per-position masks). Compiled, fc1 and fc2 run on the units the tokens
keep (:mod:`dynprune.runtime.neurons`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from dynprune.granularity.base import FlopsTerms, Granularity, Site, add_gate, layout_of, register_granularity
from dynprune.hooks import DecideHook, HookSwitch, MaskHook
from dynprune.runtime.neurons import NeuronExecutor
from dynprune.trace import LayerInfo, Trace, reaches_residual


@dataclass
class NeuronSite(Site):
    """A gated MLP fc1; ``readers``: the Linear layers reading its hidden units (an MLP's fc2)."""

    readers: tuple[str, ...] = ()


@register_granularity("neuron")
class NeuronGranularity(Granularity):
    """Gates (N, T, H) per-token masks over the hidden units of token MLPs (fc1 -> activation -> fc2)."""

    name = "neuron"
    executor = NeuronExecutor()

    def candidates(self, trace: Trace) -> list[str]:
        return list(trace.layers)

    def ineligible(self, trace: Trace, name: str) -> str | None:
        info = trace.layers.get(name)
        if info is None or info.channel_dim != -1:
            return "it is not a Linear layer"
        if len(trace.modules[name].in_shape or ()) != 2:
            return f"its input {trace.modules[name].in_shape} is not tokens (T, D)"
        if info.residual or info.calls != 1:
            return "its output feeds a residual addition, or it is called several times per forward pass"
        if not any(other.producer == name for other in trace.layers.values()):
            return ("its output does not reach another Linear through zero-preserving ops only (an MLP's fc1 "
                    "does; attention's q/k/v do not)")
        return None

    def default(self, trace: Trace, skip_first: bool, skip_last: bool) -> list[str]:
        return [n for n in trace.layers if self.ineligible(trace, n) is None]

    def attach(self, model: nn.Module, trace: Trace, name: str, gate: str, gate_kwargs: dict[str, float],
               switch: HookSwitch) -> Site:
        info = trace.layers[name]
        layer = model.get_submodule(name)
        layout = layout_of(trace.modules[name].in_shape, "tokens", per_position=True)
        net, path = add_gate(model, name, gate, info.in_channels, info.out_channels, gate_kwargs, layout)
        layer.register_forward_pre_hook(DecideHook(switch, net))
        layer.register_forward_hook(MaskHook(switch, net, -1))
        readers = tuple(other.name for other in trace.layers.values() if other.producer == name)
        return NeuronSite(name, self, info.out_channels, (name,), layout, gate_path=path, readers=readers)

    def flops_terms(self, site: Site, mask: Tensor) -> FlopsTerms:
        return FlopsTerms(masks={site.name: mask})

    def skips_when_closed(self, site: Site, layers: dict[str, LayerInfo]) -> bool:
        """Every unit off leaves fc2's bias on the residual stream: a skipped branch, not a cut network."""
        return reaches_residual(layers, site.name)
