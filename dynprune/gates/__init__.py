"""Gate families by name: ``create_gate("sigmoid", in_channels, out_channels)``; ``list_gates()``."""

from __future__ import annotations

from dynprune.gates import l1, policy, sigmoid  # noqa: F401  (registers)
from dynprune.gates.base import Gate
from dynprune.gates.l1 import L1Gate
from dynprune.gates.policy import PolicyGate
from dynprune.gates.registry import GATES, register_gate
from dynprune.gates.sigmoid import SigmoidGate


def create_gate(name: str, in_channels: int, out_channels: int, **kwargs: float) -> Gate:
    """Instantiate the gate family ``name`` for a layer with the given channel counts."""
    return GATES.get(name)(in_channels, out_channels, **kwargs)


def list_gates() -> list[str]:
    """Names of every registered gate family."""
    return GATES.names()


__all__ = ["Gate", "L1Gate", "PolicyGate", "SigmoidGate", "create_gate", "list_gates", "register_gate"]
