"""Head-gated execution: an attention module runs only the heads its inputs keep.

:class:`HeadAttention` decides (N, heads) from the module input, takes the union of the heads any input of the
batch keeps (at batch 1: exactly that input's heads), and runs the module's own forward with ``heads`` set to
that number while its query, key and value layers output only those heads' rows and its output projection reads
only their columns (:class:`HeadProjection`); inside the union, an input that drops a head has that head's slice
of the projection's input multiplied by 0, as in the masked model. With no head kept the module outputs the
projection's bias (a module returning a tuple, e.g. transformers' with its attention weights, runs one head
multiplied by 0 instead). The gathered weights
for a union of heads are cached (a few heads have few unions). Decoding with a KV cache is refused: a cache
holds every head of the past tokens, and the decision, made once per sequence from all of its tokens, is not
causal.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynprune.backbones.vit import KVCache
from dynprune.gates.base import Gate
from dynprune.runtime.decide import decide, se_gate
from dynprune.runtime.executor import Executor
from dynprune.runtime.wrap import Wrapper

if TYPE_CHECKING:
    from dynprune.granularity.head import HeadSite as Site

CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""Keyword arguments through which attention modules receive a KV cache."""


class HeadSlot:
    """What the projections of one attention module read during a call: the kept channels (None: all) and, where
    inputs disagree or decisions are soft, the per-input channel scale (N, u * head_dim)."""

    def __init__(self) -> None:
        self.key: bytes | None = None
        self.channels: Tensor | None = None
        self.scale: Tensor | None = None


class HeadProjection(Wrapper):
    """q, k or v (``reads_heads=False``: outputs the kept heads' rows) or proj (``reads_heads=True``: reads their
    columns, scaled per input where needed) of a head-gated attention; gathered weights cached per union."""

    wrapped = "layer"
    cache_size = 16

    def __init__(self, layer: nn.Linear, slot: HeadSlot, reads_heads: bool) -> None:
        super().__init__()
        self.layer, self.reads_heads = layer, reads_heads
        self.slot = slot  # plain reference, shared by the module's four projections
        self.packs: OrderedDict[bytes, tuple[Tensor, Tensor | None]] = OrderedDict()

    def weights(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) restricted to the kept heads' rows (q/k/v) or columns (proj)."""
        slot, layer = self.slot, self.layer
        if slot.channels is None:
            return layer.weight, layer.bias
        found = self.packs.pop(slot.key, None)
        if found is None:
            if self.reads_heads:
                found = layer.weight.index_select(1, slot.channels).contiguous(), layer.bias
            else:
                bias = layer.bias.index_select(0, slot.channels) if layer.bias is not None else None
                found = layer.weight.index_select(0, slot.channels), bias
            if len(self.packs) >= self.cache_size:
                self.packs.popitem(last=False)
        self.packs[slot.key] = found  # the most recently used last
        return found

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, D) -> (N, T, u * head_dim) for q/k/v; (N, T, u * head_dim) -> (N, T, D) for proj."""
        if self.reads_heads and self.slot.scale is not None:
            x = x * self.slot.scale.view(len(x), *[1] * (x.dim() - 2), -1)
        return F.linear(x, *self.weights())


class HeadAttention(Wrapper):
    """An attention module (query/key/value/output projections and a head count its forward reads) run on the heads
    its gate keeps; other attributes read the module's."""

    wrapped = "attn"

    def __init__(self, attn: nn.Module, gate: Gate, site: Site) -> None:
        super().__init__()
        self.attn, self.gate, self.head_dim = attn, gate, site.head_dim
        self.count_attr, self.returns_tensor = site.count_attr, site.returns_tensor
        self.heads = getattr(attn, site.count_attr)
        self.se_gate = se_gate(gate)
        self.slot = HeadSlot()
        for role, child in site.roles.items():
            setattr(attn, child, HeadProjection(getattr(attn, child), self.slot, reads_heads=role == "proj"))
        self.proj = getattr(attn, site.roles["proj"])
        self.register_buffer("offsets", torch.arange(site.head_dim), persistent=False)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """(N, T, D) -> the module's output as the masked module gives it (further arguments passed on)."""
        if any(isinstance(a, KVCache) for a in (*args, *kwargs.values())) or any(
                kwargs.get(k) is not None for k in CACHE_ARGS):
            raise ValueError("head gates decide once per sequence from all of its tokens: decoding with a KV cache "
                             "is not supported (run the whole sequence, or gate neurons instead)")
        d, binary = decide(self.gate, self.gate.pool(x), self.se_gate)  # (N, heads)
        on = d if binary else d != 0
        union = on[0] if len(on) == 1 else on.any(0)
        kept = union.nonzero().flatten()
        if len(kept) == 0 and self.returns_tensor:  # every head off: the output projection's bias
            layer = self.proj.layer
            out = x.new_zeros(*x.shape[:-1], layer.out_features)
            return out + layer.bias if layer.bias is not None else out
        if len(kept) == 0:  # a module returning more than a tensor runs one head, multiplied by 0
            kept, d = kept.new_zeros(1), d.new_zeros(d.shape)
        slot, every = self.slot, len(kept) == self.heads
        slot.key = None if every else kept.cpu().numpy().tobytes()
        slot.channels = None if every else (kept[:, None] * self.head_dim + self.offsets).flatten()
        scale = d if every else d.index_select(1, kept)
        needed = not binary or (len(on) > 1 and not bool(scale.all())) or not bool(scale.any())
        slot.scale = scale.to(x.dtype).repeat_interleave(self.head_dim, dim=1) if needed else None
        setattr(self.attn, self.count_attr, len(kept))
        try:
            return self.attn(x, *args, **kwargs)
        finally:
            setattr(self.attn, self.count_attr, self.heads)


class HeadExecutor(Executor):
    """Wraps a head site's attention module in :class:`HeadAttention`."""

    def wrap(self, module: nn.Module, site: Site, gate: Gate, inner: list[Gate],
             slots: dict[str, Any]) -> nn.Module | None:
        return HeadAttention(module, gate, site)
