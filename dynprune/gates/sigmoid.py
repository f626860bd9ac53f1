"""Sigmoid gate: hard 0.5 threshold in train and eval, straight-through gradient in training."""

from __future__ import annotations

from torch import Tensor

from dynprune.gates.base import Gate, StraightThrough
from dynprune.gates.registry import register_gate


@register_gate("sigmoid")
class SigmoidGate(Gate):
    """m = 1[sigma(G(x)) >= 0.5]; backward uses d sigma (straight-through), so train == eval net."""

    def train_decisions(self, logits: Tensor) -> Tensor:
        return StraightThrough.apply(logits.sigmoid())
