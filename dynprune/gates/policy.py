"""REINFORCE policy gate: Bernoulli(sigma(G(x))) samples in training, log-prob kept for the update."""

from __future__ import annotations

import torch
from torch import Tensor

from dynprune.gates.base import Gate
from dynprune.gates.registry import register_gate


@register_gate("policy")
class PolicyGate(Gate):
    """Training samples m ~ Bernoulli(p) (no gradient through m) and stores
    ``log_prob`` (N,) = sum_c log pi(m_c | x); eval uses m = 1[p > 0.5].

    The gate learns only from the REINFORCE term -(R - b) * log_prob built by the module, with
    reward R = -(task loss) - lam * cost: higher loss and more open gates are worse.
    """

    def __init__(self, in_channels: int, out_channels: int, init_bias: float = 2.0, **kwargs: float) -> None:
        super().__init__(in_channels, out_channels, init_bias=init_bias, **kwargs)
        self.log_prob: Tensor | None = None

    def mask_from_probs(self, probs: Tensor) -> Tensor:
        if not self.training:
            self.log_prob = None
            return (probs > 0.5).to(probs.dtype)
        mask = torch.bernoulli(probs.detach())
        dist = torch.distributions.Bernoulli(probs=probs.clamp(1e-6, 1 - 1e-6))
        self.log_prob = dist.log_prob(mask).sum(dim=1)
        return mask
