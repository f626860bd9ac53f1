"""Block-gated execution: a residual block or branch runs only on the sub-batch of inputs that execute it.

``index_select`` gathers those inputs, the block runs on them, ``index_copy`` writes the results back;
skipped inputs pass through unchanged (a whole block) or contribute zeros (a branch). When no input runs
a branch, a 0-dim zero is returned: the residual addition it feeds broadcasts it. On the masked path
(``set_masked(True)``, see :mod:`dynprune.runtime.dispatch`) a mixed batch runs the block on every input and
selects, as the masked model does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dynprune.gates.base import Gate
from dynprune.runtime.decide import decide, se_gate
from dynprune.runtime.wrap import Wrapper


class SubBatchBlock(Wrapper):
    """Runs ``block`` on the inputs its gate keeps; ``whole``: skipped inputs pass through, else add zero.
    Other attributes read those of ``block``.

    ``inner`` are the gates of sites inside the block: decisions forced per input (N, units) are narrowed
    to the sub-batch while it runs, so forcing means the same thing as in the masked model.
    """

    def __init__(self, block: nn.Module, gate: Gate, whole: bool, inner: Sequence[Gate] = ()) -> None:
        super().__init__()
        self.block, self.gate, self.whole = block, gate, whole
        self.inner = list(inner)  # plain references: the gates belong to their own sites
        self.se_gate = se_gate(gate)
        self.masked = False

    def set_masked(self, on: bool) -> None:
        """Take the masked path (``on``: a mixed batch runs the block on every input, then selects) or the
        sub-batch path; both give the same outputs."""
        self.masked = on

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """(N, ...) -> (N, ...) as the masked block: d * f(x) (+ (1 - d) * x for a whole block).

        Further arguments (e.g. a second tensor a block adds to its output) are passed on, tensors with the
        batch dim narrowed to the sub-batch like ``x``."""
        d, binary = self.decisions(x)
        run = d != 0
        n_run = int(run.sum())
        if n_run == 0:
            return x if self.whole else x.new_zeros(())
        if n_run == len(d) or self.masked:
            idx, inputs = None, x
        else:
            idx = run.nonzero().flatten()
            inputs, d = x.index_select(0, idx), d.index_select(0, idx)
            args = tuple(_rows(a, idx, len(x)) for a in args)
            kwargs = {k: _rows(v, idx, len(x)) for k, v in kwargs.items()}
        out = self.run(inputs, idx, len(x), args, kwargs)
        if not binary and bool((d != 1).any()):  # forced or soft decisions: the masked model's arithmetic
            d = d.to(out.dtype).view(-1, *[1] * (out.dim() - 1))
            out = d * out + (1 - d) * inputs if self.whole else d * out
        elif n_run < len(d) and idx is None:  # the masked path with binary decisions: select per input
            run = run.view(-1, *[1] * (out.dim() - 1))
            out = torch.where(run, out, inputs if self.whole else out.new_zeros(()))
        if idx is None:
            return out
        base = x.clone() if self.whole else out.new_zeros((len(x), *out.shape[1:]))
        return base.index_copy_(0, idx, out)

    def decisions(self, x: Tensor) -> tuple[Tensor, bool]:
        """Per-input decisions (N,) from the block input (N, C, ...), and whether they are binary."""
        d, binary = decide(self.gate, self.gate.pool(x), self.se_gate)
        return d[:, 0], binary

    def run(self, inputs: Tensor, idx: Tensor | None, batch: int, args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None) -> Tensor:
        """The block on the sub-batch ``inputs`` (rows ``idx`` of a batch of ``batch``; None: all rows)."""
        forced = [g for g in self.inner if idx is not None and g.forced is not None and g.forced.dim() == 2
                  and len(g.forced) == batch]
        saved = [g.forced for g in forced]
        try:
            for g in forced:
                g.forced = g.forced.index_select(0, idx)
            return self.block(inputs, *args, **(kwargs or {}))
        finally:
            for g, f in zip(forced, saved, strict=True):
                g.forced = f


def _rows(value: Any, idx: Tensor, batch: int) -> Any:
    """Rows ``idx`` of a tensor argument with the batch dim (size ``batch``); anything else unchanged."""
    if isinstance(value, Tensor) and value.dim() and len(value) == batch:
        return value.index_select(0, idx)
    return value
