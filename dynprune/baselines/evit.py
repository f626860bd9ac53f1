"""EViT (Liang et al., ICLR 2022): keep the tokens the CLS token attends to most, fuse the rest into one.

At each chosen block, between the attention and the MLP, the ceil(keep_rate * (T - 1)) non-CLS tokens with the
highest CLS attention (averaged over heads) are kept and the others are fused into one token, their average
weighted by that attention. (EViT sums the attention-weighted tokens; dividing by the attention they hold keeps the
fused token at the scale of a token, which matters when the model was never trained with it.) The CLS token is
always kept and every input keeps the same number of tokens, so batches stay rectangular. Training-free on a dense
checkpoint, or fine-tuned: the wrapper shares the model's weights and is an ordinary nn.Module.

    model = apply_evit(vit, keep_rate=0.5)                      # at EViT's default blocks
    rate, ratio = pick_evit_keep_rate(vit, target=2.0)          # keep rate for 2x fewer FLOPs
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dynprune.baselines.reduce import TokenReducedViT, gather_tokens, pick_for_ratio
from dynprune.checks import check_number


def default_locations(depth: int) -> tuple[int, ...]:
    """EViT's blocks 4, 7 and 10 of 12 (0-based 3, 6, 9) scaled to ``depth``: floor(i * depth / 4), i = 1, 2, 3."""
    return tuple(sorted({i * depth // 4 for i in (1, 2, 3)} - {0}))


class EViT(TokenReducedViT):
    """A ViT that keeps the top ``keep_rate`` of its non-CLS tokens by CLS attention at ``locations`` (block
    indices; None: :func:`default_locations`) and fuses the rest into one token when ``fuse``; weights are
    shared with the wrapped model. (N, C, S, S) -> logits (N, num_classes)."""

    def __init__(self, model: nn.Module, keep_rate: float, locations: Sequence[int] | None = None,
                 fuse: bool = True) -> None:
        super().__init__(model)
        check_number("keep_rate", keep_rate, 0, 1, low_open=True)
        locations = default_locations(self.depth) if locations is None else tuple(locations)
        for loc in locations:
            check_number("locations", loc, 0, self.depth - 1, integer=True)
        if list(locations) != sorted(set(locations)) or not locations:
            raise ValueError(f"locations must be distinct block indices in increasing order, got {list(locations)}")
        self.keep_rate, self.locations, self.fuse = keep_rate, locations, fuse

    def kept(self, tokens: int) -> int:
        """Non-CLS tokens kept out of ``tokens`` (CLS included) at a reducing block (rounded to 9 decimals first, so
        that a rate k / n keeps k of n tokens despite float error)."""
        return math.ceil(round(self.keep_rate * (tokens - 1), 9))

    def reduce(self, index: int, x: Tensor, size: Tensor, keys: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """At a chosen block: CLS, the top tokens by the CLS query's attention (``weights`` (N, H, T, T) averaged
        over heads) in decreasing order and the fused rest -> (N, T', D) and sizes (N, T'); elsewhere the input."""
        k = self.kept(x.shape[1])
        if index not in self.locations or k == x.shape[1] - 1:
            return x, size
        cls_attn = weights[:, :, 0].mean(dim=1)  # (N, T)
        order = cls_attn[:, 1:].argsort(dim=-1, descending=True) + 1
        top, rest = order[:, :k], order[:, k:]
        parts, sizes = [x[:, :1], gather_tokens(x, top)], [size[:, :1], size.gather(1, top)]
        if self.fuse:
            weight = cls_attn.gather(1, rest)  # (N, T - 1 - k)
            fused = (gather_tokens(x, rest) * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)
            parts.append(fused[:, None])
            sizes.append(size.gather(1, rest).sum(1, keepdim=True))
        return torch.cat(parts, dim=1), torch.cat(sizes, dim=1)

    def token_counts(self) -> list[tuple[int, int]]:
        """Per block, (tokens in attention, tokens in the MLP)."""
        counts, tokens = [], self.vit.num_tokens
        for index in range(self.depth):
            attn_tokens = tokens
            k = self.kept(tokens)
            if index in self.locations and k < tokens - 1:
                tokens = 1 + k + int(self.fuse)
            counts.append((attn_tokens, tokens))
        return counts


def apply_evit(model: nn.Module, keep_rate: float, locations: Sequence[int] | None = None,
               fuse: bool = True) -> EViT:
    """``model`` (a dynprune VisionTransformer) keeping the top ``keep_rate`` tokens by CLS attention at
    ``locations``."""
    return EViT(model, keep_rate, locations, fuse)


def pick_evit_keep_rate(model: nn.Module, target: float, locations: Sequence[int] | None = None, fuse: bool = True,
                        tol: float = 0.03) -> tuple[float, float]:
    """The keep rate k / (T - 1) (k = 1 .. T - 1 tokens at the first location) whose FLOPs ratio is nearest
    ``target`` (within ``tol``), and that ratio, both from ``FlopCounterMode``."""
    probe = EViT(model, 1.0, locations, fuse)
    patches = probe.vit.num_tokens - 1
    rates = [k / patches for k in range(1, patches + 1)]
    return pick_for_ratio(rates, lambda rate: EViT(model, rate, locations, fuse), model, probe.input_shape, target,
                          tol)
