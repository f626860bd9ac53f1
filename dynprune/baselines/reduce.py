"""The shared machinery of the training-free token-reduction baselines (ToMe, EViT) on dynprune's ViT.

:class:`TokenReducedViT` wraps a :class:`~dynprune.backbones.vit.VisionTransformer` without copying its weights
(ToMe's in-place patching, as a module): it runs the same patch embedding, blocks, norm and head, but computes each
block's attention itself so that it can add a per-key logit bias (ToMe's proportional attention) and read the keys
and the CLS token's attention probabilities, then lets the subclass shorten the sequence between the attention and
the MLP. The subclass states how many tokens each block sees, so its FLOPs have a closed form
(:meth:`TokenReducedViT.expected_flops`) that a test holds against ``FlopCounterMode``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

from einops import rearrange
from torch import Tensor, nn

from dynprune.backbones.vit import Attention, TorchAttention, VisionTransformer
from dynprune.checks import check_number
from dynprune.flops import count_flops

P = TypeVar("P")


def _explicit(attn: nn.Module) -> Attention:
    """The block's attention as explicit q/k/v/proj layers: itself, or a converted copy of nn.MultiheadAttention."""
    if isinstance(attn, Attention):
        return attn
    if isinstance(attn, TorchAttention):
        return Attention.from_multihead(attn.mha)
    raise TypeError(f"unsupported attention module {type(attn).__name__}; expected Attention or TorchAttention")


def attend(attn: Attention, x: Tensor, logit_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Self-attention of (N, T, D) tokens with an optional per-key logit bias (N, T) added before the softmax.

    Returns the output (N, T, D), the keys (N, H, T, D / H) and the attention probabilities (N, H, T, T), so that a
    reduction reads what it needs without recomputing it.
    """
    q, k, v = (rearrange(layer(x), "n t (h d) -> n h t d", h=attn.heads) for layer in (attn.q, attn.k, attn.v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (N, H, T, T)
    if logit_bias is not None:
        scores = scores + logit_bias[:, None, None, :]
    weights = scores.softmax(dim=-1)
    return attn.proj(rearrange(weights @ v, "n h t d -> n t (h d)")), k, weights


class TokenReducedViT(nn.Module):
    """A ViT whose blocks shorten the token sequence after attention: (N, C, S, S) -> logits (N, num_classes).

    Subclasses implement :meth:`reduce` (the sequence between a block's attention and its MLP) and
    :meth:`token_counts`, and may bias the attention logits by token sizes (:meth:`logit_bias`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"token reduction wraps dynprune's VisionTransformer, got {type(model).__name__}")
        self.vit = model
        self.attns = nn.ModuleList(_explicit(block.attn) for block in model.blocks)
        side = math.isqrt(model.num_tokens - 1)
        self.input_shape = (model.patch_embed.in_channels, *(side * p for p in model.patch_embed.stride))

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.vit.blocks)

    def reduce(self, index: int, x: Tensor, size: Tensor, keys: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Block ``index``'s shorter sequence: tokens (N, T, D) and sizes (N, T), given the block's attention keys
        (N, H, T, d) and probabilities (N, H, T, T) -> (N, T', D) and (N, T')."""
        raise NotImplementedError

    def logit_bias(self, index: int, size: Tensor) -> Tensor | None:
        """A per-key bias (N, T) of block ``index``'s attention logits from the token sizes (N, T); None: none."""
        return None

    def token_counts(self) -> list[tuple[int, int]]:
        """Per block, the tokens its attention and its MLP see (each block's attention sees the previous MLP's)."""
        raise NotImplementedError

    def extra_flops(self) -> int:
        """Matmul FLOPs of the reduction itself on one input (0 unless the subclass computes with matmuls)."""
        return 0

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, S, S) -> logits (N, num_classes)."""
        tokens = self.vit.tokens(x)
        size = tokens.new_ones(tokens.shape[:2])
        for index, (block, attn) in enumerate(zip(self.vit.blocks, self.attns, strict=True)):
            out, keys, weights = attend(attn, block.norm1(tokens), self.logit_bias(index, size))
            tokens, size = self.reduce(index, tokens + out, size, keys, weights)
            tokens = tokens + block.mlp(block.norm2(tokens))
        return self.vit.head(self.vit.norm(tokens)[:, 0])

    def expected_flops(self) -> int:
        """Closed-form FLOPs (2 MACs) of one input, counting what ``FlopCounterMode`` counts: the patch embedding,
        q/k/v/proj and the two attention matmuls at each block's attention tokens, the MLP at its MLP tokens, the
        head on the CLS token and :meth:`extra_flops`."""
        vit = self.vit
        dim, hidden = vit.head.in_features, vit.blocks[0].mlp.fc1.out_features
        embed = vit.patch_embed
        patches = vit.num_tokens - 1
        total = 2 * patches * dim * embed.in_channels * math.prod(embed.kernel_size) + 2 * dim * vit.head.out_features
        for attn_tokens, mlp_tokens in self.token_counts():
            total += 2 * 4 * attn_tokens * dim * dim + 2 * 2 * attn_tokens ** 2 * dim
            total += 2 * 2 * mlp_tokens * dim * hidden
        return total + self.extra_flops()


def flops_ratio(dense: nn.Module, reduced: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Dense FLOPs / reduced FLOPs of one (1, *input_shape) input, both counted by ``FlopCounterMode``."""
    return count_flops(dense, input_shape)[0] / count_flops(reduced, input_shape)[0]


def pick_for_ratio(candidates: Sequence[P], build: Callable[[P], nn.Module], dense: nn.Module,
                   input_shape: tuple[int, ...], target: float, tol: float = 0.03) -> tuple[P, float]:
    """The candidate whose model's FLOPs ratio (``FlopCounterMode``) is nearest ``target`` on a log scale, with
    that ratio; a ValueError names the reachable range when the nearest FLOPs miss 1 / ``target`` by more than
    ``tol`` (relative)."""
    check_number("target", target, 1, low_open=True)
    check_number("tol", tol, 0, low_open=True)
    if not candidates:
        raise ValueError("no candidates to pick from")
    dense_flops = count_flops(dense, input_shape)[0]
    ratios = [dense_flops / count_flops(build(c), input_shape)[0] for c in candidates]
    best = min(range(len(candidates)), key=lambda i: abs(math.log(ratios[i] / target)))
    if abs(target / ratios[best] - 1) > tol:
        raise ValueError(f"target={target:g} is not reachable within tol={tol:g}: the candidates give FLOPs ratios "
                         f"{min(ratios):.3g} to {max(ratios):.3g}, nearest {ratios[best]:.3g}")
    return candidates[best], ratios[best]


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Tokens (N, T, C) at ``index`` (N, K) -> (N, K, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
