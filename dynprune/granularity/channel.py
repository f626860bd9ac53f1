"""Channel granularity: a gate per conv/linear layer decides which of its output channels run.

Compiled, each gated layer runs as a ThinLayer on its kept output channels (and the layer reading it on
those input channels only).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from dynprune.gates import Gate
from dynprune.granularity.base import FlopsTerms, Granularity, Layout, Site, add_gate, register_granularity
from dynprune.hooks import DecideHook, HookSwitch, MaskHook
from dynprune.runtime.executor import Executor
from dynprune.trace import LayerInfo, Trace, reaches_residual


@dataclass
class ChannelSite(Site):
    """A gated layer; ``norm``: the BatchNorm after which its mask applies (None: on its output);
    ``channel_dim``: the dim of the channels the decisions mask (1, or -1 for a channels-last Linear)."""

    norm: str | None = None
    channel_dim: int = 1


class ChannelExecutor(Executor):
    """The gated layer runs thin, deciding from its own input."""

    def gated(self, site: Site, gate: Gate) -> dict[str, Gate]:
        return {site.name: gate}


@register_granularity("channel")
class ChannelGranularity(Granularity):
    """Gates (N, C_out) output-channel masks of Conv2d/Linear layers; applied after the layer's
    BatchNorm when it has one (so gated channels are exactly zero), along dim 1 for convs and the
    last dim for Linear (channels-last inputs work)."""

    name = "channel"
    executor = ChannelExecutor()

    def candidates(self, trace: Trace) -> list[str]:
        return list(trace.layers)

    def ineligible(self, trace: Trace, name: str) -> str | None:
        info = trace.layers.get(name)
        if info is None:
            return "it is not a Conv2d/Linear layer"
        if info.residual:
            return ("its output feeds a residual addition, so gating its channels would not skip them (the "
                    "shortcut still fills them); gate the block's inner layers, or the block (granularity='block')")
        if info.calls != 1:
            return (f"it is called {info.calls} times per forward pass (a reused module); one gate cannot decide "
                    "for several calls: give each call its own module")
        if info.out_channels < 2:
            return "it has a single output channel"
        return None

    def default(self, trace: Trace, skip_first: bool, skip_last: bool) -> list[str]:
        names = list(trace.layers)
        return names[1 if skip_first else 0: len(names) - 1 if skip_last else None]

    def attach(self, model: nn.Module, trace: Trace, name: str, gate: str, gate_kwargs: dict[str, float],
               switch: HookSwitch) -> Site:
        info = trace.layers[name]
        layer = model.get_submodule(name)
        rank = len(trace.modules[name].in_shape or ())
        layout = Layout("image" if info.channel_dim == 1 else "vector" if rank == 1 else "tokens", info.channel_dim)
        net, path = add_gate(model, name, gate, info.in_channels, info.out_channels, gate_kwargs, layout)
        layer.register_forward_pre_hook(DecideHook(switch, net))
        target = model.get_submodule(info.norm) if info.norm is not None else layer
        target.register_forward_hook(MaskHook(switch, net, info.channel_dim))
        return ChannelSite(name, self, info.out_channels, (name,), layout, gate_path=path, norm=info.norm,
                           channel_dim=info.channel_dim)

    def flops_terms(self, site: Site, mask: Tensor) -> FlopsTerms:
        return FlopsTerms(masks={site.name: mask})

    def skips_when_closed(self, site: Site, layers: dict[str, LayerInfo]) -> bool:
        """A layer whose output reaches a residual addition only skips a branch when closed."""
        return reaches_residual(layers, site.name)
