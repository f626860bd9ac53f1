"""Modules that apply a gate's per-input mask to a layer's output channels."""

from __future__ import annotations

from torch import Tensor, nn

from dynprune.gates.base import Gate


def apply_mask(out: Tensor, mask: Tensor) -> Tensor:
    """Multiply (N, C, ...) by a mask (N, C), broadcasting over the trailing dims."""
    return out * mask.view(*mask.shape, *([1] * (out.dim() - 2)))


class GatedLayer(nn.Module):
    """Wraps a Conv2d/Linear: the gate reads the layer input, its mask zeroes output channels.

    When a BatchNorm normalises this layer's raw output, ``mask_output`` is False and the mask is
    applied after that BatchNorm (by :class:`MaskAfter`), so gated channels are exactly zero and
    BN running statistics see the dense activations.
    """

    def __init__(self, layer: nn.Module, gate: Gate, mask_output: bool = True) -> None:
        super().__init__()
        self.layer, self.gate, self.mask_output = layer, gate, mask_output

    @property
    def mask(self) -> Tensor | None:
        """The mask (N, C_out) of the last forward pass."""
        return self.gate.mask

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, ...) -> (N, C_out, ...), channels off where the mask is 0."""
        mask = self.gate(x)
        out = self.layer(x)
        return apply_mask(out, mask) if self.mask_output else out


class MaskAfter(nn.Module):
    """Wraps the BatchNorm that follows a GatedLayer and applies that layer's mask to its output."""

    def __init__(self, module: nn.Module, source: GatedLayer) -> None:
        super().__init__()
        self.module = module
        # A plain attribute, not a submodule: the source is owned by its own parent.
        object.__setattr__(self, "source", source)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise, then zero the channels the source's gate turned off."""
        mask = self.source.mask
        if mask is None:
            raise RuntimeError("MaskAfter ran before its GatedLayer produced a mask")
        return apply_mask(self.module(x), mask)
