"""Forward hooks that apply a gate's per-input decisions to a module, leaving the module itself as it is.

A gated module keeps its type, attributes and ``state_dict`` keys (its gate is a child named
``dynprune_gate``, or, for a container such as ``nn.Sequential`` that runs all its children, a child
of the nearest non-container ancestor named ``dynprune_gate__<path>``), so a model's own code that
reads ``conv.stride`` or checks ``isinstance`` keeps working. The hooks are small picklable objects
(not closures), so ``copy.deepcopy`` of a gated model gives an independent gated model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dynprune.gates.base import Gate


class HookSwitch:
    """One per gated model: ``enabled = False`` makes every hook a no-op (tracing, dense counts)."""

    def __init__(self) -> None:
        self.enabled = True


def apply_mask(out: Tensor, mask: Tensor, channel_dim: int = 1) -> Tensor:
    """Multiply (N, ..., C, ...) by a mask (N, C) along ``channel_dim``, broadcasting elsewhere, or a
    channels-last output (N, T, C) by a per-position mask of its shape."""
    if mask.dim() > 2:
        if mask.shape != out.shape or channel_dim % out.dim() != out.dim() - 1:
            raise ValueError(f"a per-position mask {tuple(mask.shape)} applies to a channels-last output of its "
                             f"shape, got {tuple(out.shape)} with channels on dim {channel_dim}")
        return out * mask
    dim = channel_dim % out.dim()
    shape = [1] * out.dim()
    shape[0], shape[dim] = mask.shape[0], mask.shape[1]
    return out * mask.reshape(shape)


class DecideHook:
    """Forward pre-hook: the gate reads the module's input and decides (kept on the gate)."""

    def __init__(self, switch: HookSwitch, gate: Gate) -> None:
        self.switch, self.gate = switch, gate

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if self.switch.enabled:
            self.gate(inputs[0])


class MaskHook:
    """Forward hook: zero the output channels that ``source``'s gate turned off.

    Registered on the gated layer itself, or on the BatchNorm that normalises its raw output (so BN
    statistics see the dense activations and gated channels are exactly zero). ``expand`` maps the gate's
    decisions to the channel mask (e.g. :class:`PrefixMask`; None: they are the mask).
    """

    def __init__(self, switch: HookSwitch, gate: Gate, channel_dim: int,
                 expand: Callable[[Tensor], Tensor] | None = None) -> None:
        self.switch, self.gate, self.channel_dim, self.expand = switch, gate, channel_dim, expand

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if not self.switch.enabled:
            return None
        mask = self.gate.mask
        if mask is None:
            raise RuntimeError("a gated layer's mask was applied before its gate decided")
        if self.expand is not None:
            mask = self.expand(mask)
        if output.shape[self.channel_dim] != mask.shape[-1]:
            raise ValueError(f"gated output has {output.shape[self.channel_dim]} channels on dim "
                             f"{self.channel_dim}, its gate decides {mask.shape[-1]}")
        return apply_mask(output, mask.to(output.dtype), self.channel_dim)


class PrefixMask:
    """Nested width decisions (N, K-1) -> a prefix channel mask (N, C) for widths w_1 < ... < w_K = 1.

    Unit k says "wider than w_k"; channel group k (from w_k * C up to w_{k+1} * C) runs when units 1..k all
    say yes (a cumulative product, differentiable where the units are), so the kept channels are always a
    contiguous prefix: the first ceil(w * C) channels of the chosen width w.
    """

    def __init__(self, widths: list[float], channels: int) -> None:
        bounds = [math.ceil(w * channels) for w in widths]
        self.group = torch.zeros(channels, dtype=torch.long)  # channel -> width group (0: always on)
        for k in range(1, len(widths)):
            self.group[bounds[k - 1]:bounds[k]] = k
        self.channels = channels

    def __call__(self, units: Tensor) -> Tensor:
        on = torch.cat([torch.ones_like(units[:, :1]), units.cumprod(dim=1)], dim=1)  # (N, K)
        return on[:, self.group.to(units.device)]


class SkipHook:
    """Forward hook of a gated block, decision d (N, 1) (or (N, T, 1) per position of a channels-last (N, T, D)
    output): a residual branch gives d * f(x); a whole block gives d * f(x) + (1 - d) * x (a skipped block
    passes its input through)."""

    def __init__(self, switch: HookSwitch, gate: Gate, whole: bool) -> None:
        self.switch, self.gate, self.whole = switch, gate, whole

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if not self.switch.enabled:
            return None
        d = self.gate.mask
        d = d.to(output.dtype)
        d = d.reshape(d.shape[0], *([1] * (output.dim() - 1))) if d.dim() == 2 else d
        return d * output + (1 - d) * inputs[0] if self.whole else d * output
