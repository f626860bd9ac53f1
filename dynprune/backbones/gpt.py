"""A character-level GPT: causal, pre-norm blocks with explicit ``attn.q/k/v/proj`` and ``mlp.fc1/fc2`` layers
(shared with the ViT), learned positions, and a KV-cache decode path (``generate``) at any batch size."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynprune.backbones.registry import register_language_model
from dynprune.backbones.vit import Block, KVCache, init_weights


class CharGPT(nn.Module):
    """Token + position embeddings -> ``depth`` causal pre-norm blocks -> LayerNorm -> linear head.

    ``forward(idx)``: token ids (N, T) with T <= ``block_size`` -> next-token logits (N, T, vocab_size).
    """

    def __init__(self, vocab_size: int, block_size: int, dim: int = 256, depth: int = 6, heads: int = 8,
                 mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if vocab_size < 2 or block_size < 1 or depth < 1:
            raise ValueError(f"vocab_size must be >= 2, block_size and depth >= 1; got {vocab_size}, "
                             f"{block_size}, {depth}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.vocab_size, self.block_size, self.heads = vocab_size, block_size, heads
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(block_size, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.input_shape = (block_size,)
        init_weights(self)

    def forward(self, idx: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        """Token ids (N, T) -> logits (N, T, vocab_size); with ``caches`` (one per block, see :meth:`new_caches`),
        ``idx`` continues the sequences the caches hold."""
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32):
            raise ValueError(f"expected integer token ids of shape (N, T), got {idx.dtype} {tuple(idx.shape)}")
        start = caches[0].length if caches else 0
        if start + idx.shape[1] > self.block_size:
            raise ValueError(f"sequence of {start + idx.shape[1]} positions exceeds block_size={self.block_size}")
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for i, block in enumerate(self.blocks):
            x = block(x, cache=caches[i] if caches else None)
        return self.head(self.norm(x))

    def new_caches(self, batch: int) -> list[KVCache]:
        """Empty KV caches for ``batch`` sequences of up to ``block_size`` positions, one per block."""
        weight = self.tok_emb.weight
        head_dim = weight.shape[1] // self.heads
        return [KVCache.empty(batch, self.heads, self.block_size, head_dim, weight) for _ in self.blocks]

    @torch.no_grad()
    def generate(self, idx: Tensor, new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Extend prompts (N, T) by ``new_tokens`` ids with a KV cache: (N, T + new_tokens).

        ``temperature`` 0 decodes greedily, > 0 samples from softmax(logits / temperature).
        """
        if new_tokens < 0 or temperature < 0:
            raise ValueError(f"new_tokens and temperature must be >= 0, got {new_tokens}, {temperature}")
        if idx.shape[1] + new_tokens > self.block_size:
            raise ValueError(f"prompt ({idx.shape[1]}) + new_tokens ({new_tokens}) exceeds block_size="
                             f"{self.block_size}")
        caches = self.new_caches(len(idx))
        logits = self(idx, caches)[:, -1]
        out = [idx]
        for step in range(new_tokens):
            if step:
                logits = self(out[-1], caches)[:, -1]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                nxt = torch.multinomial((logits / temperature).softmax(dim=-1), 1, generator=generator)
            out.append(nxt)
        return torch.cat(out, dim=1)


@register_language_model("char_gpt")
def char_gpt(vocab_size: int, block_size: int, dim: int = 256, depth: int = 6, heads: int = 8,
             mlp_ratio: float = 4.0, dropout: float = 0.0) -> nn.Module:
    """Character-level GPT (nanoGPT's Shakespeare shape at dim 256, 8 heads of 32, 6 layers, MLP ratio 4)."""
    return CharGPT(vocab_size, block_size, dim, depth, heads, mlp_ratio, dropout)
