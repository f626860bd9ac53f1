"""Head granularity: per input, which attention heads of a multi-head attention module run (Deja Vu's heads).

A site is an attention module on tokens (N, T, D) with separate query, key, value and output Linear children
(``q/k/v/proj`` as in :class:`dynprune.backbones.vit.Attention`, or ``q_proj/k_proj/v_proj/o_proj`` as in
transformers' ViT) and an integer head count attribute (``heads``, ``num_heads`` or ``num_attention_heads``). Its
gate reads the module's input, pooled over tokens, and decides (N, heads); a head that is off contributes nothing:
its slice of the output projection's input is zeroed (a pre-hook), so its q/k/v output rows, its share of the
attention core (QK^T and AV) and its output-projection columns need not run. FLOPs: q, k and v keep the kept heads'
output channels, the output projection and the attention core scale with the kept fraction of heads.
``nn.MultiheadAttention`` packs q/k/v into one ``in_proj_weight`` and runs every head inside one op: it is refused
(convert it with ``Attention.from_multihead``), and so is one fused q/k/v layer (GPT-2's ``c_attn``, a transformers
``Conv1D``); so is causal attention (a decision from every token would let each position see later ones). Compiled,
the module runs with only its kept heads (:mod:`dynprune.runtime.heads`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from dynprune.gates import Gate
from dynprune.granularity.base import FlopsTerms, Granularity, Site, add_gate, layout_of, register_granularity
from dynprune.hooks import DecideHook, HookSwitch
from dynprune.runtime.heads import HeadExecutor
from dynprune.trace import LayerInfo, Trace, reaches_residual

ROLES = {"q": ("q", "q_proj"), "k": ("k", "k_proj"), "v": ("v", "v_proj"), "proj": ("proj", "o_proj", "out_proj")}
"""The child names each projection of an attention module may have."""
HEAD_COUNTS = ("heads", "num_heads", "num_attention_heads")
"""The attribute names of the head count that an attention module's forward may read."""


@dataclass
class HeadSite(Site):
    """A gated attention module (``units`` heads): ``head_dim`` channels per head, ``roles`` {q, k, v, proj: child
    name}, ``count_attr``: its head-count attribute, ``returns_tensor``: whether it outputs a tensor (not a tuple)."""

    head_dim: int = 1
    roles: dict[str, str] = field(default_factory=dict)
    count_attr: str = "heads"
    returns_tensor: bool = True

    def layer(self, role: str) -> str:
        """Module path of the ``q``, ``k``, ``v`` or ``proj`` layer."""
        return f"{self.name}.{self.roles[role]}"


def find_roles(trace: Trace, name: str) -> dict[str, str] | None:
    """{role: child name} of the Linear projections of module ``name`` (None: one is missing)."""
    roles = {}
    for role, names in ROLES.items():
        found = [n for n in names if (info := trace.layers.get(f"{name}.{n}")) is not None and info.channel_dim == -1]
        if not found:
            return None
        roles[role] = found[0]
    return roles


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
        roles = find_roles(trace, name)
        fused = [n for n, info in trace.layers.items() if n.rpartition(".")[0] == name
                 and info.channel_dim == -1 and info.out_channels == 3 * info.in_channels]
        if roles is None and fused:
            return (f"its query, key and value come from one fused D -> 3D layer '{fused[0]}' (as GPT-2's c_attn), "
                    "whose per-head slices dynprune does not split out (and GPT-2's attention is causal, where a "
                    "per-input head decision would let each position see later ones: gate its MLP neurons per "
                    "token instead, granularity='neuron')")
        if roles is None:
            return ("it has no query, key, value and output Linear children (q/k/v/proj or q_proj/k_proj/v_proj/"
                    "o_proj; nn.MultiheadAttention packs q/k/v into one in_proj_weight: convert it with "
                    "dynprune.backbones.vit.Attention.from_multihead)")
        layers = [trace.layers[f"{name}.{child}"] for child in roles.values()]
        dim = layers[0].in_channels
        if any(info.in_channels != dim or info.out_channels != dim or info.calls != 1 for info in layers):
            return "its query, key, value and output layers are not all D -> D layers called once"
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
        if getattr(module, "causal", False) or getattr(module, "is_causal", False):
            raise ValueError(f"cannot gate '{name}' at granularity 'head': its attention is causal, and a per-input "
                             "head decision pools every token, so each position would see later ones (gate its "
                             "MLP neurons per token instead: granularity='neuron')")
        roles = find_roles(trace, name)
        dim = trace.layers[f"{name}.{roles['q']}"].out_channels
        count_attr = next((a for a in HEAD_COUNTS if isinstance(getattr(module, a, None), int)), None)
        heads = getattr(module, count_attr) if count_attr else None
        if heads is None or heads < 1 or dim % heads:
            raise ValueError(f"cannot gate '{name}' at granularity 'head': it needs an integer head count "
                             f"({', '.join(HEAD_COUNTS)}) dividing its {dim} channels, got {heads!r}")
        layout = layout_of(trace.modules[name].in_shape, "tokens")
        net, path = add_gate(model, name, gate, dim, heads, gate_kwargs, layout)
        module.register_forward_pre_hook(DecideHook(switch, net))
        getattr(module, roles["proj"]).register_forward_pre_hook(HeadMaskHook(switch, net, dim // heads))
        return HeadSite(name, self, heads, tuple(f"{name}.{c}" for c in roles.values()), layout, gate_path=path,
                        head_dim=dim // heads, roles=roles, count_attr=count_attr,
                        returns_tensor=trace.modules[name].out_shape is not None)

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
