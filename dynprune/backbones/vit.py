"""A small pre-norm Vision Transformer for 28x28 images (DeiT-Tiny's shape scaled to a CPU) and the
attention/MLP/block modules the character-level GPT shares.

Every block names its linear layers ``attn.q``, ``attn.k``, ``attn.v``, ``attn.proj``, ``mlp.fc1`` and
``mlp.fc2``, so token, head and neuron gates can hook into named ``nn.Linear`` modules; the attention is
computed with explicit matmuls, which ``FlopCounterMode`` counts. ``attention="torch"`` swaps in
``nn.MultiheadAttention`` (its fused kernels are not counted by ``FlopCounterMode`` on CPU, so this variant
calls it on its unfused, counted path), as a reference and for models built that way. Decisions travel as
arguments (DynamicViT style): ``Block.forward(x, keep)`` takes an optional per-token keep mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from dynprune.backbones.registry import register_backbone, scale_depth, scale_width

ATTENTIONS = ("explicit", "torch")


@dataclass
class KVCache:
    """Keys and values of the positions decoded so far, (N, H, max_len, head_dim) each, filled up to ``length``."""

    keys: Tensor
    values: Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, max_len: int, head_dim: int, like: Tensor) -> KVCache:
        """An empty cache for ``max_len`` positions, with ``like``'s dtype and device."""
        shape = (batch, heads, max_len, head_dim)
        return cls(like.new_zeros(shape), like.new_zeros(shape))

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (N, H, T, d) keys and values; return all of them so far, (N, H, length, d) each."""
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions; {end} were asked for")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def attention_allowed(keep: Tensor) -> Tensor:
    """Which keys each query may attend to, (N, 1, T, T) bools, from a hard keep mask (N, T) of bools: the kept
    ones and itself (:func:`attention_policy` as a mask)."""
    eye = torch.eye(keep.shape[1], dtype=torch.bool, device=keep.device)
    return (keep[:, None, :] | eye)[:, None]


def attention_policy(keep: Tensor) -> Tensor:
    """Key weights (N, 1, T, T) from a per-token keep mask (N, T): query i may attend to key j when j is kept,
    and always to itself (DynamicViT's policy), so a dropped token's row stays well defined."""
    eye = torch.eye(keep.shape[1], dtype=keep.dtype, device=keep.device)
    return (keep[:, None, :] + (1 - keep[:, None, :]) * eye)[:, None]


def _check_keep(keep: Tensor, x: Tensor) -> None:
    n, t = x.shape[:2]
    if keep.shape != (n, t) and not (keep.dtype == torch.bool and keep.shape == (n, 1, t, t)):
        raise ValueError(f"keep mask has shape {tuple(keep.shape)}; expected (N, T) = {(n, t)}, or bools "
                         f"(N, 1, T, T) = {(n, 1, t, t)} (attention_allowed's)")


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``proj`` layers: (N, T, D) -> (N, T, D).

    ``keep`` (N, T) in [0, 1] re-weights keys as DynamicViT's softmax with policy does (0: masked out of every
    other token's attention; differentiable in ``keep``); a bool ``keep`` (N, T), or the (N, 1, T, T) bools
    :func:`attention_allowed` makes of it (computed once for several blocks), masks the same keys out before the
    softmax instead (the same weights in fewer passes, for inference); ``causal`` hides later positions; a ``cache``
    (:class:`KVCache`) makes ``x`` the next positions of a sequence whose earlier keys and values it holds.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False, bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim, bias=bias) for _ in range(4))

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> Attention:
        """An Attention computing what ``mha`` computes (its packed in-projection split into q, k, v)."""
        if not mha._qkv_same_embed_dim or mha.in_proj_bias is None or mha.bias_k is not None:
            raise ValueError("only nn.MultiheadAttention with one embed dim, biases and no bias_k/bias_v converts")
        attn = cls(mha.embed_dim, mha.num_heads).to(mha.in_proj_weight)
        with torch.no_grad():
            for layer, w, b in zip((attn.q, attn.k, attn.v), mha.in_proj_weight.chunk(3),
                                   mha.in_proj_bias.chunk(3), strict=True):
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            attn.proj.load_state_dict(mha.out_proj.state_dict())
        return attn

    def forward(self, x: Tensor, keep: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """(N, T, D) -> (N, T, D); ``keep`` (N, T) (floats, or bools) or None."""
        q, k, v = (rearrange(layer(x), "n t (h d) -> n h t d", h=self.heads) for layer in (self.q, self.k, self.v))
        past = 0
        if cache is not None:
            if keep is not None:
                raise ValueError("a keep mask and a KV cache cannot be combined")
            past = cache.length
            k, v = cache.extend(k, v)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (N, H, T, past + T)
        if self.causal:
            rows = torch.arange(past, past + q.shape[2], device=x.device)[:, None]
            scores = scores.masked_fill(torch.arange(k.shape[2], device=x.device) > rows, float("-inf"))
        if keep is not None:
            _check_keep(keep, x)
        if keep is not None and keep.dtype == torch.bool:
            scores = scores.where(keep if keep.dim() == 4 else attention_allowed(keep), float("-inf"))
        weights = scores.softmax(dim=-1)
        if keep is not None and keep.dtype != torch.bool:
            weights = weights * attention_policy(keep.to(weights.dtype))
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.proj(rearrange(weights @ v, "n h t d -> n t (h d)"))


class TorchAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention: (N, T, D) -> (N, T, D), hard keep masks (N, T) only.

    Called sequence-first with ``need_weights=True``: its batch-first fast path and its scaled-dot-product
    kernel are invisible to ``FlopCounterMode`` on CPU; this path computes the same values with counted matmuls.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.mha = nn.MultiheadAttention(dim, heads)

    def forward(self, x: Tensor, keep: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """(N, T, D) -> (N, T, D); ``keep`` (N, T) of 0/1, attention_allowed's (N, 1, T, T) bools, or None."""
        if cache is not None:
            raise ValueError("attention='torch' has no KV cache; use attention='explicit'")
        n, t = x.shape[:2]
        blocked = torch.zeros(n, 1, t, t, dtype=torch.bool, device=x.device)
        if keep is not None and keep.dim() == 4:  # attention_allowed's (N, 1, T, T)
            _check_keep(keep, x)
            blocked = ~keep
        elif keep is not None:
            _check_keep(keep, x)
            if ((keep != 0) & (keep != 1)).any():
                raise ValueError("attention='torch' takes hard keep masks (0/1); use attention='explicit' for "
                                 "soft ones")
            blocked = blocked | (attention_policy(keep.to(x.dtype)) == 0)
        if self.causal:
            blocked = blocked | torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        mask = repeat(blocked, "n 1 i j -> (n h) i j", h=self.heads) if blocked.any() else None
        seq = rearrange(x, "n t d -> t n d")
        out, _ = self.mha(seq, seq, seq, attn_mask=mask, need_weights=True, average_attn_weights=False)
        return rearrange(out, "t n d -> n t d")


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 over the last dim: (N, T, D) -> (N, T, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, D) -> (N, T, D)."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); (N, T, D) -> (N, T, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attention: str = "explicit",
                 causal: bool = False) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention '{attention}'; choose one of: {', '.join(ATTENTIONS)}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (Attention if attention == "explicit" else TorchAttention)(dim, heads, causal=causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))

    def forward(self, x: Tensor, keep: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """(N, T, D) -> (N, T, D); ``keep`` (N, T) (or :func:`attention_allowed`'s (N, 1, T, T)) masks tokens out
        of attention (None: all kept)."""
        x = x + self.attn(self.norm1(x), keep, cache)
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear and embedding weights, zero biases (the ViT/GPT-2 recipe)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
            nn.init.zeros_(m.in_proj_bias)


class VisionTransformer(nn.Module):
    """Patch embedding (a strided conv) + CLS token + learned positions -> pre-norm blocks -> LayerNorm ->
    linear head on the CLS token; (N, C, S, S) -> logits (N, num_classes)."""

    def __init__(self, num_classes: int, in_chans: int, input_size: int, patch_size: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float, attention: str) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}")
        self.num_tokens = 1 + (input_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, attention) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_weights(self)

    def tokens(self, x: Tensor) -> Tensor:
        """(N, C, S, S) -> the CLS token and patch tokens with positions, (N, 1 + (S / patch)^2, D)."""
        patches = rearrange(self.patch_embed(x), "n d h w -> n (h w) d")
        cls = self.cls_token.expand(len(x), -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embed

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, S, S) -> logits (N, num_classes)."""
        tokens = self.tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens)[:, 0])


@register_backbone("vit")
def vit(num_classes: int, in_chans: int, input_size: int, width_mult: float = 1.0, depth_mult: float = 1.0,
        patch_size: int = 4, attention: str = "explicit", heads: int = 3, mlp_ratio: float = 4.0) -> nn.Module:
    """ViT with DeiT-Tiny's shape (3 heads, MLP ratio 4) at dim 96 x depth 6, scaled by ``width_mult`` (dim, a
    multiple of ``heads``) and ``depth_mult``; ``patch_size`` 4 gives 49 tokens + CLS at 28x28, 2 gives 196;
    ``attention`` ``explicit`` (q/k/v/proj layers) or ``torch`` (nn.MultiheadAttention)."""
    if heads < 1 or mlp_ratio <= 0 or patch_size < 1:
        raise ValueError(f"heads and patch_size must be >= 1 and mlp_ratio > 0, got heads={heads}, "
                         f"patch_size={patch_size}, mlp_ratio={mlp_ratio}")
    dim = scale_width(96, width_mult, divisor=heads)
    return VisionTransformer(num_classes, in_chans, input_size, patch_size, dim, scale_depth(6, depth_mult), heads,
                             mlp_ratio, attention)
