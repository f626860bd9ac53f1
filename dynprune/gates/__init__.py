"""Gate families by name: ``create_gate("sigmoid", in_channels, units)``; ``list_gates()``."""

from __future__ import annotations

from dynprune.gates import gumbel, l1, policy, sigmoid  # noqa: F401  (registers)
from dynprune.gates.base import Gate, GateContext, Rollout
from dynprune.gates.gumbel import GumbelGate
from dynprune.gates.l1 import L1Gate
from dynprune.gates.policy import PolicyGate
from dynprune.gates.registry import GATES, register_gate
from dynprune.gates.sigmoid import SigmoidGate

DEFAULT_GATE = "sigmoid"
"""The family a task gates with unless told otherwise."""


def create_gate(name: str, in_channels: int, units: int, **kwargs: float) -> Gate:
    """Instantiate the gate family ``name`` deciding ``units`` things from ``in_channels`` inputs."""
    return GATES.get(name)(in_channels, units, **kwargs)


def list_gates() -> list[str]:
    """Names of every registered gate family."""
    return GATES.names()


__all__ = ["DEFAULT_GATE", "Gate", "GateContext", "GumbelGate", "L1Gate", "PolicyGate", "Rollout", "SigmoidGate",
           "create_gate", "list_gates", "register_gate"]
