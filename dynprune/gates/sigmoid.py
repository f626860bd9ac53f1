"""Sigmoid gate: hard 0.5 threshold in train and eval, straight-through gradient in training."""

from __future__ import annotations

import torch
from torch import Tensor

from dynprune.gates.base import Gate
from dynprune.gates.registry import register_gate


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly 1[p > 0.5]; backward: the gradient passes to p unchanged."""

    @staticmethod
    def forward(ctx: object, probs: Tensor) -> Tensor:
        return (probs > 0.5).to(probs.dtype)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad


@register_gate("sigmoid")
class SigmoidGate(Gate):
    """m = 1[sigma(G(x)) > 0.5]; backward uses d sigma (straight-through), so train == eval net."""

    def mask_from_probs(self, probs: Tensor) -> Tensor:
        return _StraightThrough.apply(probs) if self.training else (probs > 0.5).to(probs.dtype)
