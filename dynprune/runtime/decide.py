"""A gate's decisions at inference, without the bookkeeping the training path needs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dynprune.gates.base import Gate


def se_gate(gate: Gate) -> bool:
    """Whether ``gate`` keeps the base class's SE network and hard rule (so :func:`decide` may inline them)."""
    return type(gate).logits is Gate.logits and type(gate).hard_decisions is Gate.hard_decisions


def decide(gate: Gate, pooled: Tensor, inline: bool) -> tuple[Tensor, bool]:
    """Decisions (N, units) from a pooled input (N, C_in), and whether they are binary.

    An unforced gate deciding hard gives a bool tensor (``inline``: the SE net called without module
    overhead); a forced or soft gate runs its own forward and gives its float decisions.
    """
    if gate.forced is not None or not gate.hard:
        return gate(pooled), False
    if inline:
        hidden = F.linear(pooled, gate.fc1.weight, gate.fc1.bias).relu_()
        return F.linear(hidden, gate.fc2.weight, gate.fc2.bias) >= 0, True
    return gate.hard_decisions(gate.logits(pooled)) != 0, True
