"""Head-gated execution: an attention module runs only the heads its inputs keep.

:class:`HeadAttention` decides (N, heads) from the module input, takes the union of the heads any input of the
batch keeps (at batch 1: exactly that input's heads), and runs the module's own forward with ``heads`` set to
that number while its q, k, v layers output only those heads' rows and proj reads only their columns
(:class:`HeadProjection`); inside the union, an input that drops a head has that head's slice of proj's input
multiplied by 0, as in the masked model. With no head kept the module outputs proj's bias. The gathered weights
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

from dynprune.gates.base import Gate
from dynprune.runtime.decide import decide, se_gate
from dynprune.runtime.executor import Executor
from dynprune.runtime.wrap import Wrapper

if TYPE_CHECKING:
    from dynprune.granularity.base import Site


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
    """An attention module (q/k/v/proj, ``heads``) run on the heads its gate keeps; other attributes read the
    module's."""

    wrapped = "attn"

    def __init__(self, attn: nn.Module, gate: Gate, head_dim: int) -> None:
        super().__init__()
        self.attn, self.gate, self.head_dim, self.heads = attn, gate, head_dim, attn.heads
        self.se_gate = se_gate(gate)
        self.slot = HeadSlot()
        for role in ("q", "k", "v", "proj"):
            setattr(attn, role, HeadProjection(getattr(attn, role), self.slot, reads_heads=role == "proj"))
        self.register_buffer("offsets", torch.arange(head_dim), persistent=False)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """(N, T, D) -> (N, T, D) as the masked module (further arguments, e.g. a keep mask, passed on)."""
        if kwargs.get("cache") is not None or (len(args) > 1 and args[1] is not None):
            raise ValueError("head gates decide once per sequence from all of its tokens: decoding with a KV cache "
                             "is not supported (run the whole sequence, or gate neurons instead)")
        d, binary = decide(self.gate, self.gate.pool(x), self.se_gate)  # (N, heads)
        on = d if binary else d != 0
        union = on[0] if len(on) == 1 else on.any(0)
        kept = union.nonzero().flatten()
        slot = self.slot
        if len(kept) == 0:  # every head off: proj's input is zero, its output the bias
            proj = self.attn.proj.layer
            out = x.new_zeros(*x.shape[:-1], proj.out_features)
            return out + proj.bias if proj.bias is not None else out
        all_heads = len(kept) == self.heads
        slot.key = None if all_heads else union.cpu().numpy().tobytes()
        slot.channels = None if all_heads else (kept[:, None] * self.head_dim + self.offsets).flatten()
        scale = d if all_heads else d.index_select(1, kept)
        needed = not binary or (len(on) > 1 and not bool(scale.all()))
        slot.scale = scale.to(x.dtype).repeat_interleave(self.head_dim, dim=1) if needed else None
        self.attn.heads = len(kept)
        try:
            return self.attn(x, *args, **kwargs)
        finally:
            self.attn.heads = self.heads


class HeadExecutor(Executor):
    """Wraps a head site's attention module in :class:`HeadAttention`."""

    def wrap(self, module: nn.Module, site: Site, gate: Gate, inner: list[Gate],
             slots: dict[str, Any]) -> nn.Module | None:
        return HeadAttention(module, gate, site.head_dim)
