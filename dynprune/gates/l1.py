"""L1-sparsity gate: soft mask sigma(G(x)) in training (penalised by L1), thresholded at eval."""

from __future__ import annotations

from torch import Tensor

from dynprune.gates.base import Gate
from dynprune.gates.registry import register_gate


@register_gate("l1")
class L1Gate(Gate):
    """Training multiplies by the soft mask; eval keeps channels with sigma >= ``threshold``.

    Reported accuracy is therefore the accuracy *after* thresholding.
    """

    def __init__(self, in_channels: int, out_channels: int, threshold: float = 0.5, **kwargs: float) -> None:
        super().__init__(in_channels, out_channels, **kwargs)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"l1 gate threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold

    def mask_from_probs(self, probs: Tensor) -> Tensor:
        return probs if self.training else (probs >= self.threshold).to(probs.dtype)
