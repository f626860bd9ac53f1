"""Neuron-gated execution: a transformer MLP (fc1 -> zero-preserving activation -> fc2) computes only the hidden
units that its tokens keep.

fc1 becomes :class:`NeuronIn`: its gate decides (N, T, H) from fc1's input, and fc1 runs on the rows of the
*union* of the units any token of the batch keeps; inside the union, a unit a token drops is multiplied by 0
(its pre-activation is exactly 0, as in the masked model, so the activation keeps it 0). The output stays thin
(N, T, u): fc2 becomes :class:`NeuronOut`, which multiplies by the same u rows of its transposed weight (a
contiguous row gather, then one GEMM; at a single position an embedding bag, which reads each kept row once and
copies no weights: the gather would cost as much memory traffic as the dense product it replaces). At a single
token (batch 1 decode with a KV cache) the union is that token's own units: exactly the kept rows of fc1 and
columns of fc2 run, TEAL / Deja Vu style. With many tokens (a prefill, a ViT image, batch > 1) the union is what
runs, so the executed FLOPs are
``T x dense_per_token x |union| / H`` per MLP, not the per-token mean the FLOPs profile reports; per-token
gathers were measured slower than one gathered GEMM over the union on CPU (one weight gather per token costs as
much as the matmul it saves). When fc1's output has other readers than fc2, fc1 scatters back to full width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from dynprune.gates.base import Gate
from dynprune.runtime.decide import decide, se_gate
from dynprune.runtime.executor import Executor
from dynprune.runtime.wrap import Wrapper
from dynprune.trace import is_linear, linear_weight

if TYPE_CHECKING:
    from dynprune.granularity.base import Site


def union_rows(decisions: Tensor, binary: bool, positions: int) -> Tensor:
    """Indices of the units (last dim) that any of the ``positions`` positions of ``decisions`` (..., H) keeps,
    ascending."""
    on = decisions if binary else decisions != 0
    if positions > 1:
        on = on.reshape(-1, on.shape[-1]).any(0)
    return on.reshape(-1).nonzero().flatten()


class NeuronIn(Wrapper):
    """fc1 on the union of the kept hidden units: (N, T, D) -> (N, T, u), exact zeros where a token drops a unit
    of the union; ``kept`` names the u units (None: all H). ``scatter``: write them back to (N, T, H) instead.
    ``layer``: an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2)."""

    wrapped = "layer"

    def __init__(self, layer: nn.Module, gate: Gate, scatter: bool) -> None:
        super().__init__()
        self.layer, self.gate, self.scatter = layer, gate, scatter
        self.se_gate = se_gate(gate)
        self.reads_tokens = gate.per_position and gate.channel_dim == -1  # pooling (N, T, D) would be a no-op
        self.kept: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Tokens (N, T, D) -> hidden pre-activations of the kept units (N, T, u) (or (N, T, H) scattered)."""
        gate = self.gate
        d, binary = decide(gate, x if self.reads_tokens else gate.pool(x), self.se_gate)  # (N, T, H)
        units, positions = d.shape[-1], x.numel() // x.shape[-1]
        rows: Tensor | None = union_rows(d, binary, positions)
        weight, bias = linear_weight(self.layer), self.layer.bias  # (H, D): a view of a Conv1D's (D, H)
        if len(rows) == units:
            rows = None
        else:
            weight = weight.index_select(0, rows)
            bias = bias.index_select(0, rows) if bias is not None else None
        out = F.linear(x, weight, bias)
        if not binary or positions > 1:  # tokens may disagree inside the union, or forced/soft decisions
            kept = d if rows is None else d.index_select(-1, rows)
            if not binary or not bool(kept.all()):
                out = out * kept.to(out.dtype)
        if self.scatter and rows is not None:
            out = out.new_zeros(*out.shape[:-1], units).index_copy_(-1, rows, out)
            rows = None
        self.kept = rows
        return out


class NeuronOut(Wrapper):
    """fc2 reading :class:`NeuronIn`'s thin output: (N, T, u) -> (N, T, D) with the u kept columns of its weight.
    ``bag_at_one_position``: at a single position, an embedding bag over the kept rows (False: the gathered GEMM
    used for many positions, to measure the difference)."""

    wrapped = "layer"
    bag_at_one_position = True

    def __init__(self, layer: nn.Module, source: NeuronIn) -> None:
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "source", source)  # a reference, not a submodule
        self.register_buffer("weight_t", linear_weight(layer).detach().t().contiguous(), persistent=False)  # (H, D)

    def forward(self, h: Tensor) -> Tensor:
        """Thin hidden activations (N, T, u) -> (N, T, D)."""
        rows = self.source.kept
        if rows is None:
            return self.layer(h)
        bias = self.layer.bias
        if self.bag_at_one_position and h.shape[-1] and h.numel() == h.shape[-1]:  # one position: sparse GEMV
            out = F.embedding_bag(rows[None], self.weight_t, per_sample_weights=h.reshape(1, -1), mode="sum")
            return (out if bias is None else out.add_(bias)).reshape(*h.shape[:-1], -1)
        weight = self.weight_t.index_select(0, rows)  # (u, D): contiguous rows, no strided column gather
        return F.linear(h, weight.t(), bias)


class NeuronExecutor(Executor):
    """Replaces a neuron site's fc1 by :class:`NeuronIn` and, when fc2 is its only reader, fc2 by
    :class:`NeuronOut` (the hidden activations pass thin between them)."""

    def replace(self, site: Site, gate: Gate, module: Callable[[str], nn.Module]) -> dict[str, nn.Module]:
        readers = getattr(site, "readers", ())
        thin = len(readers) == 1 and is_linear(module(readers[0]))
        first = NeuronIn(module(site.name), gate, scatter=not thin)
        return {site.name: first, readers[0]: NeuronOut(module(readers[0]), first)} if thin else {site.name: first}
