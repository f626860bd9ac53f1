"""Head granularity: per input, which attention heads of a multi-head attention module run (Deja Vu's heads).

A site is an attention module with separate ``q``, ``k``, ``v`` and ``proj`` Linear children on tokens (N, T, D)
and an integer ``heads`` attribute that its forward reads (:class:`dynprune.backbones.vit.Attention`). Its gate
reads the module's input, pooled over tokens, and decides (N, heads); a head that is off contributes nothing: its
slice of proj's input is zeroed (a pre-hook on proj), so its q/k/v output rows, its share of the attention core
(QK^T and AV) and its proj columns need not run. FLOPs: q, k and v keep the kept heads' output channels, proj
and the attention core scale with the kept fraction of heads. ``nn.MultiheadAttention`` packs q/k/v into one
``in_proj_weight`` and runs every head inside one op: it is refused (convert it with ``Attention.from_multihead``).
Compiled, the module runs with only its kept heads (:mod:`dynprune.runtime.heads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from dynprune.gates import Gate
from dynprune.granularity.base import FlopsTerms, Granularity, Site, add_gate, layout_of, register_granularity
from dynprune.hooks import DecideHook, HookSwitch
from dynprune.runtime.heads import HeadExecutor
from dynprune.trace import LayerInfo, Trace, reaches_residual

PROJECTIONS = ("q", "k", "v", "proj")


@dataclass
class HeadSite(Site):
    """A gated attention module; ``head_dim``: channels per head (``units`` is the number of heads)."""

    head_dim: int = 1

    def layer(self, role: str) -> str:
        """Module path of the ``q``, ``k``, ``v`` or ``proj`` layer."""
        return f"{self.name}.{role}"


def head_mask(decisions: Tensor, head_dim: int) -> Tensor:
    """Per-head decisions (N, heads) -> per-channel (N, heads * head_dim), channels grouped by head."""
    return decisions.repeat_interleave(head_dim, dim=-1)


class HeadMaskHook:
    """Forward pre-hook of the output projection: zero the input channels of the heads that are off."""

    def __init__(self, switch: HookSwitch, gate: Gate, head_dim: int) -> None:
        self.switch, self.gate, self.head_dim = switch, gate, head_dim

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not self.switch.enabled:
            return None
        mask = self.gate.mask
        if mask is None:
            raise RuntimeError("a gated attention's heads were masked before its gate decided")
        channels = head_mask(mask.to(inputs[0].dtype), self.head_dim)
        return (inputs[0] * channels.view(len(channels), *[1] * (inputs[0].dim() - 2), -1), *inputs[1:])


@register_granularity("head")
class HeadGranularity(Granularity):
    """Gates (N, heads) per-input decisions over the heads of attention modules with q/k/v/proj layers."""

    name = "head"
    executor = HeadExecutor()
    report_title = "Attention heads"

    def candidates(self, trace: Trace) -> list[str]:
        return [n for n in trace.modules if n]

    def ineligible(self, trace: Trace, name: str) -> str | None:
        layers = [trace.layers.get(f"{name}.{role}") for role in PROJECTIONS]
        if any(info is None or info.channel_dim != -1 for info in layers):
            return ("it has no q, k, v and proj Linear children (nn.MultiheadAttention packs q/k/v into one "
                    "in_proj_weight: convert it with dynprune.backbones.vit.Attention.from_multihead)")
        dim = layers[0].in_channels
        if any(info.in_channels != dim or info.out_channels != dim or info.calls != 1 for info in layers):
            return "its q, k, v and proj layers are not all D -> D layers called once"
        shape = trace.modules[name].in_shape or ()
        if len(shape) != 2:
            return f"its input {shape} is not tokens (T, D)"
        if trace.modules[name].calls != 1:
            return f"it is called {trace.modules[name].calls} times per forward pass"
        return None

    def default(self, trace: Trace, skip_first: bool, skip_last: bool) -> list[str]:
        return [n for n in self.candidates(trace) if self.ineligible(trace, n) is None]

    def attach(self, model: nn.Module, trace: Trace, name: str, gate: str, gate_kwargs: dict[str, float],
               switch: HookSwitch) -> Site:
        module = model.get_submodule(name)
        heads = getattr(module, "heads", None)
        dim = trace.layers[f"{name}.q"].out_channels
        if not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ValueError(f"cannot gate '{name}' at granularity 'head': it needs an integer `heads` attribute "
                             f"dividing its {dim} channels (its forward must read it), got {heads!r}")
        layout = layout_of(trace.modules[name].in_shape, "tokens")
        net, path = add_gate(model, name, gate, dim, heads, gate_kwargs, layout)
        module.register_forward_pre_hook(DecideHook(switch, net))
        module.proj.register_forward_pre_hook(HeadMaskHook(switch, net, dim // heads))
        return HeadSite(name, self, heads, tuple(f"{name}.{r}" for r in PROJECTIONS), layout, gate_path=path,
                        head_dim=dim // heads)

    def flops_terms(self, site: Site, mask: Tensor) -> FlopsTerms:
        channels = head_mask(mask, site.head_dim)
        kept = mask.mean(dim=-1)
        return FlopsTerms(masks={site.layer(r): channels for r in ("q", "k", "v")},
                          scale={site.name: kept, site.layer("proj"): kept})

    def skips_when_closed(self, site: Site, layers: dict[str, LayerInfo]) -> bool:
        """Every head off leaves proj's bias on the residual stream: a skipped branch, not a cut network."""
        return reaches_residual(layers, site.layer("proj"))

    def report(self, site: Site, decisions: Tensor) -> dict[str, float]:
        """Share of inputs running 0, 1, ..., heads heads."""
        counts = (decisions != 0).sum(dim=-1)
        return {f"{k} heads": float((counts == k).double().mean()) for k in range(site.units + 1)}
