"""A gate's decisions at inference, without the bookkeeping the training path needs.

Every family decides at inference by its own threshold on G(x) (``Gate.inference_threshold``), so the runtime
runs the SE net and compares its pre-activation: no sigmoid, no float mask, no module calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dynprune.gates.base import Gate


def se_gate(gate: Gate) -> bool:
    """Whether ``gate`` keeps the base class's SE network and threshold rule (so :func:`decide` may inline them)."""
    return type(gate).logits is Gate.logits and type(gate).hard_decisions is Gate.hard_decisions


def decide(gate: Gate, pooled: Tensor, inline: bool) -> tuple[Tensor, bool]:
    """Decisions (N, units) from a pooled input (N, C_in), and whether they are binary.

    An unforced gate deciding hard gives a bool tensor (``inline``: the SE net called without module
    overhead, compared with the family's threshold); a forced or soft gate runs its own forward and gives its
    float decisions.
    """
    if gate.forced is not None or not gate.hard:
        return gate(pooled), False
    if inline:
        hidden = F.linear(pooled, gate.fc1.weight, gate.fc1.bias).relu_()
        return F.linear(hidden, gate.fc2.weight, gate.fc2.bias) >= gate.inference_threshold(), True
    return gate.hard_decisions(gate.logits(pooled)) != 0, True


class HardRule:
    """An SE gate's inference decisions ``relu(p W1^T + b1) W2^T + b2 >= t`` for pooled inputs p (N, C_in) -> (N, units)
    bool: one ``addmm`` per layer on the stored transposed views W1^T, W2^T, which is what ``F.linear`` runs, so
    the scores are bitwise those of the gate (a contiguous copy of W^T takes another BLAS kernel whose rounding
    differs at batch 1, and a score at the threshold could flip).

    Built from a gate for which :func:`se_gate` holds; rebuild it after the gate's weights move or change.
    """

    __slots__ = ("b1", "b2", "threshold", "w1t", "w2t")

    def __init__(self, gate: Gate) -> None:
        if not se_gate(gate):
            raise ValueError(f"HardRule needs the base SE net and threshold rule; {type(gate).__name__} overrides them")
        with torch.no_grad():
            self.w1t, self.b1 = gate.fc1.weight.detach().t(), gate.fc1.bias.detach()
            self.w2t, self.b2 = gate.fc2.weight.detach().t(), gate.fc2.bias.detach()
        self.threshold = gate.inference_threshold()

    def __call__(self, pooled: Tensor) -> Tensor:
        """(N, C_in) -> (N, units) bool."""
        return torch.addmm(self.b2, torch.addmm(self.b1, pooled, self.w1t).relu_(), self.w2t) >= self.threshold
