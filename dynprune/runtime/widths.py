"""Width-gated execution: a block's gate picks one prefix width per input, and every layer of the block it
narrows runs on the first ceil(w * C) output channels only (a contiguous slice of its weight: no gather).

:class:`WidthBlock` decides once from the block input and publishes the units; each narrowed layer is a
:class:`~dynprune.runtime.channels.ThinLayer` whose gate is a :class:`WidthSlot` that expands those units to
its own prefix mask. A layer narrowed by nested width sites (a stage and its only block) runs the
intersection of their prefixes (:class:`NestedSlots`), as the masked model multiplies their masks. At
batch > 1 a layer computes the widest width any input chose and masks the rest, as the masked model does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dynprune.gates.base import Gate
from dynprune.hooks import PrefixMask
from dynprune.runtime.decide import decide, se_gate
from dynprune.runtime.wrap import Wrapper


class WidthBlock(Wrapper):
    """Runs ``block`` after deciding its inputs' widths (N, K-1) with ``gate`` into ``slots``; other attributes
    read those of ``block``."""

    wrapped = "block"

    def __init__(self, block: nn.Module, gate: Gate, slots: list[WidthSlot]) -> None:
        super().__init__()
        self.block, self.gate = block, gate
        self.slots = slots  # plain references: each slot belongs to its ThinLayer
        self.se_gate = se_gate(gate)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """(N, ...) -> the block's output with its layers narrowed to the chosen widths (further arguments
        passed on)."""
        units, _ = decide(self.gate, self.gate.pool(x), self.se_gate)
        level = (units != 0).long().cumprod(dim=1).sum(dim=1)  # (N,): leading units on = the width chosen
        for slot in self.slots:
            slot.level = level
        return self.block(x, *args, **kwargs)


class WidthSlot(nn.Module):
    """Takes a gate's place in a ThinLayer: its decisions are the prefix mask (N, C) of the width that the enclosing
    :class:`WidthBlock` decided for this forward pass (the layer's own input is not used).

    The mask of each width level (how many of the block's nested units are on, 0..K-1) is computed once from the
    site's :class:`~dynprune.hooks.PrefixMask`; a call indexes it (what ``PrefixMask(units) != 0`` gives).
    """

    def __init__(self, expander: PrefixMask) -> None:
        super().__init__()
        self.expander = expander
        self.register_buffer("table", expander.group[None, :] <= torch.arange(int(expander.group.max()) + 1)[:, None],
                             persistent=False)
        self.level: Tensor | None = None

    def mask(self) -> Tensor:
        """The prefix mask (N, C) of the block's chosen widths, as bools."""
        if self.level is None:
            raise RuntimeError("a width slot runs only inside its WidthBlock, which decides the widths first")
        return self.table[self.level.clamp(max=len(self.table) - 1)]  # levels past the last group keep every channel


class NestedSlots(nn.Module):
    """The slots of nested width sites narrowing one layer: the layer keeps the channels all of them keep."""

    def __init__(self, slots: list[WidthSlot]) -> None:
        super().__init__()
        self.slots = nn.ModuleList(slots)

    def mask(self) -> Tensor:
        """The intersection (N, C) of the slots' prefix masks: again a prefix."""
        out = self.slots[0].mask()
        for slot in self.slots[1:]:
            out = out & slot.mask()
        return out


def layer_slots(slots: Mapping[str, Mapping[str, WidthSlot]]) -> dict[str, WidthSlot | NestedSlots]:
    """{layer: what narrows it} from {width site: {layer: its slot}}: one slot, or the nested sites' slots."""
    per_layer: dict[str, list[WidthSlot]] = {}
    for per_site in slots.values():
        for layer, slot in per_site.items():
            per_layer.setdefault(layer, []).append(slot)
    return {layer: found[0] if len(found) == 1 else NestedSlots(found) for layer, found in per_layer.items()}
