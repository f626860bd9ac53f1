"""The Gate contract: a small SE-style network G mapping a layer's input to a channel mask.

M(x) = sigma(G(x)) with G = global-avg-pool -> fc -> ReLU -> fc. Subclasses decide how the
probabilities become the mask the layer multiplies by (hard, soft, sampled).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class Gate(nn.Module, ABC):
    """Maps a layer input (N, C_in, H, W) or (N, C_in) to a mask (N, C_out) in [0, 1].

    Args:
        in_channels: channels of the gated layer's input.
        out_channels: channels the mask covers (the layer's outputs).
        reduction: hidden width is ``max(min_hidden, in_channels // reduction)``.
        init_bias: initial bias of the last fc; 3.0 means every gate starts ~95% open.
        min_hidden: smallest hidden width of G.
    """

    def __init__(
        self, in_channels: int, out_channels: int, reduction: int = 4, init_bias: float = 3.0,
        min_hidden: int = 8,
    ) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"gate reduction must be >= 1, got {reduction}")
        hidden = max(min_hidden, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        nn.init.constant_(self.fc2.bias, init_bias)
        self.mask: Tensor | None = None

    def logits(self, x: Tensor) -> Tensor:
        """G(x): (N, C_in, ...) -> (N, C_out) pre-sigmoid scores."""
        pooled = x.flatten(2).mean(-1) if x.dim() > 2 else x
        return self.fc2(self.fc1(pooled).relu())

    def forward(self, x: Tensor) -> Tensor:
        """Mask (N, C_out) for input x; also kept as ``self.mask`` for losses and FLOPs."""
        self.mask = self.mask_from_probs(self.logits(x).sigmoid())
        return self.mask

    @abstractmethod
    def mask_from_probs(self, probs: Tensor) -> Tensor:
        """Turn sigma(G(x)) (N, C_out) into the applied mask, train or eval behaviour."""

    @staticmethod
    def cost(mask: Tensor) -> Tensor:
        """Fraction of channels kept per sample: (N, C) -> (N,), differentiable where mask is."""
        return mask.mean(dim=1)
