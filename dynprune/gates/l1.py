"""L1-sparsity gate: soft mask sigma(G(x)) in training (penalised by L1), thresholded at eval."""

from __future__ import annotations

import math

from torch import Tensor

from dynprune.gates.base import Gate
from dynprune.gates.registry import register_gate


@register_gate("l1")
class L1Gate(Gate):
    """Training multiplies by the soft mask; eval keeps units with sigma >= ``threshold``.

    Reported accuracy is therefore the accuracy *after* thresholding. Its phases: BatchNorm statistics are
    re-estimated with the thresholded masks before evaluation, and the last part of training runs with them.
    """

    phases = ("bn_recalibration", "hard_finetune")

    def __init__(self, in_channels: int, units: int, threshold: float = 0.5, **kwargs: float) -> None:
        super().__init__(in_channels, units, **kwargs)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"l1 gate threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold

    def inference_threshold(self) -> float:
        """sigma(G(x)) >= threshold is G(x) >= logit(threshold)."""
        return math.log(self.threshold / (1 - self.threshold))

    def train_decisions(self, logits: Tensor) -> Tensor:
        return logits.sigmoid()
