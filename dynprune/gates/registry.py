"""The gate registry: ``@register_gate("name")`` on a Gate subclass."""

from __future__ import annotations

from dynprune.gates.base import Gate
from dynprune.registry import Registry

GATES: Registry[Gate] = Registry("gate")
register_gate = GATES.register
