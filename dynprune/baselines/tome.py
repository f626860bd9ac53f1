"""ToMe (Bolya et al., ICLR 2023): training-free token merging for dynprune's ViT.

In every block, between the attention and the MLP, ``r`` tokens are merged into others by bipartite soft matching
on the keys (averaged over heads): the tokens alternate into sets A and B, each A token's most cosine-similar B
token is its edge, and the ``r`` A tokens with the most similar edges are merged into their B tokens by a
size-weighted average. A token's size (how many patches it holds) then enters the attention as log(size) added to
its logits (proportional attention). The CLS token is never merged. Every input merges the same number of tokens,
so batches stay rectangular.

    model = apply_tome(vit, r=4)                               # 4 merges in every block
    schedule, ratio = pick_tome_schedule(vit, target=2.0)      # r per block for 2x fewer FLOPs
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dynprune.baselines.reduce import TokenReducedViT, gather_tokens, pick_for_ratio
from dynprune.checks import check_number


def merge_tokens(x: Tensor, size: Tensor, metric: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Merge ``r`` tokens of (N, T, D) ``x`` with sizes (N, T) by bipartite soft matching on ``metric`` (N, T, d).

    Returns (N, T - r, D) tokens and (N, T - r) sizes: the unmerged A tokens in their order (CLS first), then the
    B tokens, each the size-weighted mean of itself and what merged into it.
    """
    with torch.no_grad():
        unit = F.normalize(metric, dim=-1)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)  # (N, |A|, |B|)
        scores[:, 0] = -math.inf  # CLS (token 0, in A) never merges
        best, match = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src, unmerged = order[:, :r], order[:, r:].sort(dim=-1).values
        dst = match.gather(1, src)
    mass = torch.cat([x * size[..., None], size[..., None]], dim=-1)  # (N, T, D + 1): size-weighted sums
    a, b = mass[:, ::2], mass[:, 1::2]
    b = b.scatter_add(1, dst[..., None].expand(-1, -1, mass.shape[-1]), gather_tokens(a, src))
    merged = torch.cat([gather_tokens(a, unmerged), b], dim=1)
    size = merged[..., -1]
    return merged[..., :-1] / size[..., None], size


def max_merges(tokens: int) -> int:
    """The most tokens one block can merge out of ``tokens`` (CLS included): all of set A but the CLS token."""
    return (tokens - 1) // 2


def tome_schedule(num_tokens: int, depth: int, r: int) -> list[int]:
    """ToMe's constant schedule made explicit where the sequence runs short: block l merges min(r, what it can)."""
    check_number("r", r, 0, integer=True)
    schedule = []
    for _ in range(depth):
        schedule.append(min(r, max_merges(num_tokens)))
        num_tokens -= schedule[-1]
    return schedule


class ToMe(TokenReducedViT):
    """A ViT that merges ``r[l]`` tokens in block l (an int: the same in every block); weights are shared with the
    wrapped model. (N, C, S, S) -> logits (N, num_classes)."""

    def __init__(self, model: nn.Module, r: int | Sequence[int]) -> None:
        super().__init__(model)
        schedule = [r] * self.depth if isinstance(r, int) else list(r)
        if len(schedule) != self.depth:
            raise ValueError(f"r has {len(schedule)} entries; the model has {self.depth} blocks (give one r per "
                             "block, or an int)")
        tokens = self.vit.num_tokens
        for block, merges in enumerate(schedule):
            check_number(f"r[{block}]", merges, 0, integer=True)
            if merges > max_merges(tokens):
                raise ValueError(f"r={r} merges {merges} tokens in block {block}, which holds {tokens} tokens: at "
                                 f"most {max_merges(tokens)} can merge there (tome_schedule caps r per block)")
            tokens -= merges
        self.r = schedule

    def logit_bias(self, index: int, size: Tensor) -> Tensor | None:
        """Proportional attention: log size (N, T) once an earlier block has merged (before, every size is 1)."""
        return size.log() if any(self.r[:index]) else None

    def reduce(self, index: int, x: Tensor, size: Tensor, keys: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Merge ``r[index]`` of the (N, T, D) tokens by the similarity of their keys (N, H, T, d), averaged over
        heads -> (N, T - r, D) and sizes (N, T - r)."""
        return (x, size) if self.r[index] == 0 else merge_tokens(x, size, keys.mean(dim=1), self.r[index])

    def token_counts(self) -> list[tuple[int, int]]:
        """Per block, (tokens in attention, tokens in the MLP)."""
        counts, tokens = [], self.vit.num_tokens
        for merges in self.r:
            counts.append((tokens, tokens - merges))
            tokens -= merges
        return counts

    def extra_flops(self) -> int:
        """The matching's similarity matmul, |A| x |B| x head_dim multiply-adds in each block that merges."""
        head_dim = self.attns[0].q.out_features // self.attns[0].heads
        return sum(2 * math.ceil(t / 2) * (t // 2) * head_dim for (t, _), r in zip(self.token_counts(), self.r,
                                                                                  strict=True) if r)


def apply_tome(model: nn.Module, r: int | Sequence[int]) -> ToMe:
    """``model`` (a dynprune VisionTransformer) merging ``r`` tokens per block (or ``r[l]`` in block l)."""
    return ToMe(model, r)


def pick_tome_schedule(model: nn.Module, target: float, tol: float = 0.03) -> tuple[list[int], float]:
    """The capped constant schedule (:func:`tome_schedule`) whose FLOPs ratio is nearest ``target`` (within
    ``tol``), and that ratio, both from ``FlopCounterMode``."""
    probe = ToMe(model, 0)
    tokens = probe.vit.num_tokens
    schedules = [tome_schedule(tokens, probe.depth, r) for r in range(max_merges(tokens) + 1)]
    return pick_for_ratio(schedules, lambda s: ToMe(model, s), model, probe.input_shape, target, tol)
