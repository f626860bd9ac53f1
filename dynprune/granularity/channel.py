"""Channel granularity: a gate per conv/linear layer decides which of its output channels run."""

from __future__ import annotations

from torch import Tensor, nn

from dynprune.granularity.base import Granularity, Site, add_gate, register_granularity
from dynprune.hooks import DecideHook, HookSwitch, MaskHook
from dynprune.trace import Trace


@register_granularity("channel")
class ChannelGranularity(Granularity):
    """Gates (N, C_out) output-channel masks of Conv2d/Linear layers; applied after the layer's
    BatchNorm when it has one (so gated channels are exactly zero), along dim 1 for convs and the
    last dim for Linear (channels-last inputs work)."""

    name = "channel"

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
        net, path = add_gate(model, name, gate, info.in_channels, info.out_channels, gate_kwargs, info.channel_dim)
        layer.register_forward_pre_hook(DecideHook(switch, net))
        target = model.get_submodule(info.norm) if info.norm is not None else layer
        target.register_forward_hook(MaskHook(switch, net, info.channel_dim))
        return Site(name, self.name, info.out_channels, "channel", (name,), info.norm, info.channel_dim,
                    gate_path=path)

    def flops_terms(self, site: Site, mask: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        return {site.name: mask}, None
