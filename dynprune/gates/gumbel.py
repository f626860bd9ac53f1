"""Gumbel-sigmoid gate: a relaxed Bernoulli sample with logistic noise, hard straight-through."""

from __future__ import annotations

import torch
from torch import Tensor

from dynprune.gates.base import Gate, StraightThrough
from dynprune.gates.registry import register_gate


@register_gate("gumbel")
class GumbelGate(Gate):
    """Training: m = 1[sigma((G(x) + log u - log(1 - u)) / tau) >= 0.5], u ~ U(0, 1), with the
    gradient of the relaxed sample (straight-through); eval: m = 1[G(x) >= 0].

    Args:
        temperature: tau of the relaxation (2/3 by default, as in the concrete-distribution papers).
        init_bias: starts around +2 (~88% open), so that the noise explores both decisions.
    """

    def __init__(self, in_channels: int, units: int, temperature: float = 2 / 3, init_bias: float = 2.0,
                 **kwargs: float) -> None:
        super().__init__(in_channels, units, init_bias=init_bias, **kwargs)
        if temperature <= 0:
            raise ValueError(f"gumbel gate temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def train_decisions(self, logits: Tensor) -> Tensor:
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        relaxed = ((logits + u.log() - (-u).log1p()) / self.temperature).sigmoid()
        return StraightThrough.apply(relaxed)
