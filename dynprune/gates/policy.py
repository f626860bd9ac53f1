"""REINFORCE policy gate: Bernoulli(sigma(G(x))) samples in training, trained by its own surrogate."""

from __future__ import annotations

import torch
from torch import Tensor

from dynprune.gates.base import Gate, GateContext
from dynprune.gates.registry import register_gate


@register_gate("policy")
class PolicyGate(Gate):
    """Training samples m ~ Bernoulli(p) (no gradient through m); eval uses m = 1[p >= 0.5].

    The gate learns only from its REINFORCE surrogate ``-(R - b) * log pi(m | x) - beta * H``:
    reward R = -(task loss) - price * (this gate's own cost) per input (per-layer credit: higher
    loss and more open gates are worse), baseline b = the same reward of the greedy (thresholded)
    policy on the same input (self-critical), H the policy's entropy.

    Args:
        entropy: weight beta of the entropy bonus.
        clamp: probabilities are clamped to [clamp, 1 - clamp] so a gate can always change its mind.
    """

    def __init__(self, in_channels: int, units: int, init_bias: float = 2.0, entropy: float = 0.01,
                 clamp: float = 0.02, **kwargs: float) -> None:
        super().__init__(in_channels, units, init_bias=init_bias, **kwargs)
        if not 0.0 <= clamp < 0.5:
            raise ValueError(f"policy gate clamp must be in [0, 0.5), got {clamp}")
        self.entropy, self.clamp = entropy, clamp
        self._dist: torch.distributions.Bernoulli | None = None

    def train_decisions(self, logits: Tensor) -> Tensor:
        probs = logits.sigmoid().clamp(self.clamp, 1 - self.clamp)
        self._dist = torch.distributions.Bernoulli(probs=probs)
        return self._dist.sample()

    def training_loss(self, ctx: GateContext) -> Tensor | None:
        if self._dist is None or self.mask is None or self.hard or self.forced is not None:
            return None
        log_prob = self._dist.log_prob(self.mask).sum(dim=1)
        greedy_task, greedy_costs, greedy_cost = ctx.greedy()
        price = ctx.cost_weight if ctx.price_of is None else ctx.price_of(greedy_cost.mean())
        reward = -(ctx.task_loss + price * ctx.site_cost)
        baseline = -(greedy_task + price * greedy_costs[ctx.name])
        surrogate = -((reward - baseline).detach() * log_prob).mean()
        return surrogate - self.entropy * self._dist.entropy().sum(dim=1).mean()
