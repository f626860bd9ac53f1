"""REINFORCE policy gate: Bernoulli(sigma(G(x))) samples in training, trained by its own surrogate."""

from __future__ import annotations

import math

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
    policy on the same input (self-critical; the task's hard rollout, ``ctx.rollout``), H the policy's
    entropy. The advantage R - b is scaled to unit root-mean-square over the batch, so the gate learning
    rate bounds a step whatever the loss scale.

    Args:
        entropy: weight beta of the entropy bonus.
        clamp: decisions are sampled with probabilities clamped to [clamp, 1 - clamp], so a gate can always
            change its mind; the surrogate scores them under the unclamped policy (a small off-policy bias
            beyond the clamp), where a score past the clamp keeps only its gradient back towards the boundary.
    """

    transient = (*Gate.transient, "_dist")

    def __init__(self, in_channels: int, units: int, init_bias: float = 2.0, entropy: float = 0.01,
                 clamp: float = 0.02, **kwargs: float) -> None:
        super().__init__(in_channels, units, init_bias=init_bias, **kwargs)
        if not 0.0 <= clamp < 0.5:
            raise ValueError(f"policy gate clamp must be in [0, 0.5), got {clamp}")
        self.entropy, self.clamp = entropy, clamp
        self._bound = math.log((1 - clamp) / clamp) if clamp > 0 else math.inf  # |G(x)| where p hits the clamp
        self._dist: torch.distributions.Bernoulli | None = None

    def train_decisions(self, logits: Tensor) -> Tensor:
        with torch.no_grad():  # explore: every unit is sampled off (on) at least ``clamp`` of the time
            sample = torch.bernoulli(logits.sigmoid().clamp(self.clamp, 1 - self.clamp))
        # The surrogate's log-prob and entropy: clamping the probabilities themselves would zero their gradient
        # beyond the clamp (|G(x)| > 3.9 at 0.02), freezing such a unit on or off for good. Here the gradient
        # of a score beyond the clamp passes only when it points back towards the decision boundary.
        self._dist = torch.distributions.Bernoulli(logits=InwardOnly.apply(logits, self._bound))
        return sample

    def training_loss(self, ctx: GateContext) -> Tensor | None:
        if self._dist is None or self.mask is None or self.hard or self.forced is not None:
            return None
        log_prob = self._dist.log_prob(self.mask).sum(dim=1)
        greedy = ctx.rollout()  # the greedy (thresholded) policy on the same inputs
        price = ctx.price(greedy.cost.mean())  # the cost's price where inference runs
        reward = -(ctx.task_loss + price * ctx.site_cost)
        baseline = -(greedy.task_loss + price * greedy.site_costs[ctx.name])
        advantage = (reward - baseline).detach()
        advantage = advantage / (advantage.square().mean().sqrt() + 1e-8)  # unit scale: steps the gate lr can bound
        surrogate = -(advantage * log_prob).mean()
        return surrogate - self.entropy * self._dist.entropy().sum(dim=1).mean()


class InwardOnly(torch.autograd.Function):
    """Identity on scores; backward drops the gradient of a score beyond +-bound that would push it further
    out (a descent step moves against the gradient), and keeps the gradient that brings it back."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, scores: Tensor, bound: float) -> Tensor:
        ctx.save_for_backward(scores)
        ctx.bound = bound
        return scores.view_as(scores)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (scores,) = ctx.saved_tensors
        outward = ((scores > ctx.bound) & (grad < 0)) | ((scores < -ctx.bound) & (grad > 0))
        return grad.masked_fill(outward, 0.0), None
