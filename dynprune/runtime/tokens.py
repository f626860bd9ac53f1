"""Token runtime: the compiled model physically removes the tokens token sites drop.

The blocks of a token chain (:mod:`dynprune.granularity.token`) run as one :class:`TokenStages` module put at the
first block's path (the later blocks' paths hold ``nn.Identity``): at each site the gate decides on the tokens still
present, and only the kept ones go on, so every later block runs on a shorter sequence and pays attention's cost
for the kept tokens only. At batch 1 (or when every input keeps as many tokens) the kept tokens are gathered into
a shorter dense sequence. When inputs keep different numbers, ``group`` (the default) sorts the inputs by kept count
and, per group of ``GROUP`` inputs, gathers each input's kept tokens first and pads to the group's longest, masking
the padding out of attention with the block's ``keep`` (bools: masked before the softmax); ``pad`` does the same
for the whole batch at once; ``loop`` runs the rest of the chain one input at a time. The default is measured
(``experiments/bench_token_latency.py``, ``experiments/results/token_latency*.md``, 1 CPU thread): padding beats
the loop at batch 8 and 64 (the loop pays per-input dispatch that short sequences cannot amortise; they tie at
batch 2), and at batch 64 groups beat one padded batch, most when half of the inputs keep every token and half the
CLS token alone. The output keeps each input's tokens in their original order, the CLS token first, padded after
(so a model that reads the CLS token gives the masked model's output; ``compile_for_inference`` checks it).

The masked path (``set_masked(True)``, see :mod:`dynprune.runtime.dispatch`) runs every block on the full sequence
with the cumulative keep mask, as the masked model does, and outputs every token in its original position (a
dropped token holds what the masked model holds there: it still attends to the kept tokens and itself). The
dispatch takes it where dropping tokens does not pay. Measured (``token_latency*.md``, dim 96, 1 CPU thread, gates
keeping 0.7 of the tokens at each of 3 sites): the masked path costs the dense model plus the gates and the masks
(0.82-0.84x dense at batch 1, 0.91-0.97x at 64, over two runs), the thin path 0.93-0.95x at batch 1 and
1.08-1.20x at 64 (padded or grouped), so the plan takes the thin path at batch 1, 8 and 64 there; the masked path
wins on batches of 2 to 8 where half the inputs keep every token and half the CLS token alone. At batch 1 of
this small model both paths are bound by per-op overhead, so neither is faster than dense.

Readouts: the first call of the compiled model (its check in ``compile_for_inference``) probes whether the network
after the chain reads any token but the CLS tokens (it perturbs them and compares the outputs). If it does (e.g.
mean pooling), the chain always takes the masked path: in the masked model a dropped token keeps attending to every
kept token, so its exact output costs a full sequence, and the thin path would save nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dynprune.backbones.vit import attention_allowed
from dynprune.gates.base import Gate
from dynprune.runtime.decide import decide, se_gate
from dynprune.runtime.executor import Executor
from dynprune.runtime.fold import set_submodule

if TYPE_CHECKING:
    from dynprune.granularity.base import Site

BATCH_RUNTIMES = ("pad", "group", "loop")
GROUP = 16
"""Inputs per group of the ``group`` runtime."""


def with_cls(keep: Tensor, cls_tokens: int) -> Tensor:
    """Decisions (N, T) with the first ``cls_tokens`` tokens kept (differentiable in the others)."""
    return torch.cat([torch.ones_like(keep[:, :cls_tokens]), keep[:, cls_tokens:]], dim=1)


class TokenStages(nn.Module):
    """A chain of transformer blocks run on the tokens each input keeps: (N, T, D) -> (N, T', D), T' the most
    tokens any input keeps after the last site (each input's kept tokens first, in order; padding after); on the
    masked path, or when the readout reads more than the CLS tokens, (N, T, D) as the masked model.

    Args:
        blocks: the chain's blocks, in call order (each ``block(x, keep=None)``).
        gates: {index of a site's block: its gate}.
        cls_tokens: leading tokens always kept.
        batch_runtime: ``pad``, ``group`` or ``loop``, for batches whose inputs keep different numbers of tokens.
    """

    def __init__(self, blocks: list[nn.Module], gates: dict[int, Gate], cls_tokens: int, batch_runtime: str) -> None:
        super().__init__()
        if batch_runtime not in BATCH_RUNTIMES:
            raise ValueError(f"unknown batch_runtime '{batch_runtime}'; choose one of: {', '.join(BATCH_RUNTIMES)}")
        self.blocks = nn.ModuleList(blocks)
        self.gates = nn.ModuleDict({str(i): g for i, g in gates.items()})
        self.inline = {i: se_gate(g) for i, g in gates.items()}  # stage -> its gate's SE net may be inlined
        self.cls_tokens, self.batch_runtime = cls_tokens, batch_runtime
        self.masked = False
        self.reads_all: bool | None = None
        """Whether the readout reads tokens other than the CLS tokens (None: not probed yet; masked path until)."""

    def set_masked(self, on: bool) -> None:
        """Take the masked path (``on``: every token through every block with the keep mask, in original positions)
        or the thin one (the dropped tokens removed; the masked path regardless where the readout reads them)."""
        self.masked = on

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, D) -> (N, T', D): the blocks run on the kept tokens only (thin path, CLS-only readout), or
        (N, T, D) on every token with the keep mask (masked path)."""
        rows = index = None  # where each token came from: read by forced decisions only
        if any(gate.forced is not None for gate in self.gates.values()):
            rows = torch.arange(len(x), device=x.device)
            index = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        if self.masked or self.reads_all is not False:
            return self._masked(x, index, rows)
        return self._run(x, index, None, rows, 0, fresh=True)

    def _masked(self, x: Tensor, index: Tensor | None, rows: Tensor | None) -> Tensor:
        """(N, T, D) -> (N, T, D) as the masked model: each block on every token, the dropped ones (the cumulative
        keep mask) masked out of attention as keys (the attention mask made once per site)."""
        keep = allowed = None
        for i, block in enumerate(self.blocks):
            if i in self.inline:
                decided = self._decide(i, x, index, None, rows)
                keep = decided if keep is None else keep & decided
                allowed = attention_allowed(keep)
            x = block(x, keep=allowed)
        return x

    def _decide(self, i: int, x: Tensor, index: Tensor | None, valid: Tensor | None, rows: Tensor | None) -> Tensor:
        """Kept tokens (N, T) as bools at stage ``i``: its gate's hard decisions on ``x``, or its forced decisions
        (one row per input, or one for all) read at the original positions ``index`` (N, T) of the original inputs
        ``rows`` (N,); the CLS tokens kept, padding dropped. A forced gate still runs its network, as
        ``Gate.forward`` does: forcing changes what it decides, not what it costs."""
        gate = self.gates[str(i)]
        if gate.forced is None:
            keep = decide(gate, x, self.inline[i])[0][..., 0]
        else:
            gate.logits(x)
            forced = gate.forced[..., 0]  # (), (N,) or (N or 1, T_original)
            forced = forced.reshape(-1, 1) if forced.dim() < 2 else forced
            forced = forced[rows] if len(forced) > 1 else forced.expand(len(x), -1)
            keep = (forced.gather(1, index) if forced.shape[1] > 1 else forced.expand(-1, x.shape[1])) >= 0.5
        keep[:, :self.cls_tokens] = True
        return keep if valid is None else keep & valid

    def _run(self, x: Tensor, index: Tensor | None, valid: Tensor | None, rows: Tensor | None, start: int,
             fresh: bool) -> Tensor:
        """Blocks ``start``... on tokens ``x`` (N, T, D) of the original inputs ``rows`` (N,) at original positions
        ``index`` (N, T) (both None when no gate is forced), ``valid`` (N, T) marking real tokens (None: all);
        ``fresh``: block ``start``'s gate has not decided yet."""
        for i in range(start, len(self.blocks)):
            if i in self.inline and (fresh or i > start):
                keep = self._decide(i, x, index, valid, rows)
                if len(x) == 1:  # one input: index the kept tokens, no bookkeeping
                    x = x[:, keep[0]]
                    index = None if index is None else index[:, keep[0]]
                else:
                    counts = keep.sum(dim=1)
                    size = {"pad": len(x), "group": GROUP, "loop": 1}[self.batch_runtime]
                    if size < len(x) and bool((counts != counts[0]).any()):
                        return self._groups(x, index, keep, counts, rows, i, size)
                    x, index, valid = _gather(x, index, keep, counts)
            x = self.blocks[i](x) if valid is None else self.blocks[i](x, keep=valid)
        return x

    def _groups(self, x: Tensor, index: Tensor | None, keep: Tensor, counts: Tensor, rows: Tensor | None, i: int,
                size: int) -> Tensor:
        """Blocks ``i``... per group of ``size`` inputs of similar kept counts (sorted), each padded to its own
        longest; the outputs back in input order, padded to the longest."""
        order = counts.argsort(descending=True, stable=True)
        outs = []
        for part in order.split(size):
            xs, idx, valid = _gather(x[part], None if index is None else index[part], keep[part], counts[part])
            outs.append(self._run(xs, idx, valid, None if rows is None else rows[part], i, fresh=False))
        return _stack_padded(outs)[order.argsort()]


def _gather(x: Tensor, index: Tensor | None, keep: Tensor,
            counts: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Each input's kept tokens first, in order, padded to the most kept: (tokens (N, T', D), their original
    positions (N, T'; None for ``index`` None), which are real (N, T'), None when every input keeps T')."""
    width = int(counts.max())
    if bool((counts == width).all()):
        order = keep.nonzero()[:, 1].view(len(x), width)
        valid = None
    else:
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=x.device) < counts[:, None]
    tokens = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    return tokens, None if index is None else index.gather(1, order), valid


def _stack_padded(rows: list[Tensor]) -> Tensor:
    """(N_i, T_i, D) sequences -> (sum N_i, max T_i, D), zero padded after each."""
    width = max(r.shape[1] for r in rows)
    return torch.cat([nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) for r in rows])


class TokenExecutor(Executor):
    """Each token chain's blocks become one :class:`TokenStages` at the first block's path."""

    def finish(self, net: nn.Module, sites: dict[str, Site], gates: dict[str, Gate]) -> None:
        chains = {id(s.chain): s.chain for s in sites.values()}
        for chain in chains.values():  # a chain starts at its first site
            blocks = chain.blocks
            owner = next(iter(chain.sites.values())).owner
            stages = TokenStages([net.get_submodule(b) for b in blocks],
                                 {i: gates[b] for i, b in enumerate(blocks) if b in chain.sites},
                                 chain.cls_tokens, owner.batch_runtime)
            set_submodule(net, blocks[0], stages)
            for block in blocks[1:]:
                set_submodule(net, block, nn.Identity())
        probe = ReadoutProbe([m for m in net.modules() if isinstance(m, TokenStages)])
        probe.handle = net.register_forward_pre_hook(probe)


class ReadoutProbe:
    """One-shot forward pre-hook of a compiled network: on its first call, sets each :class:`TokenStages`'s
    ``reads_all`` by whether adding 1 to the chain's non-CLS outputs changes the network's output."""

    def __init__(self, stages: list[TokenStages]) -> None:
        self.stages = stages
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def __call__(self, net: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.handle.remove()
        for stages in self.stages:
            stages.reads_all = None  # masked path: every token in its original position
        base = net(*args)
        found = []
        for stages in self.stages:
            cls = stages.cls_tokens
            shift = stages.register_forward_hook(lambda _m, _a, out, cls=cls: torch.cat([out[:, :cls],
                                                                                         out[:, cls:] + 1], 1))
            try:
                found.append(not torch.equal(net(*args), base))
            finally:
                shift.remove()
        for stages, reads in zip(self.stages, found, strict=True):
            stages.reads_all = reads
