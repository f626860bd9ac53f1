"""Channel-gated execution: a BN-folded conv/linear that computes only the output channels its gate keeps
and reads only the input channels its source layer kept.

Per batch, a gated layer keeps the union of the channels any input keeps (at batch 1: exactly that input's
channels) and multiplies by the mask restricted to them only where inputs disagree; when every channel is
in the union it runs the dense layer, so it never computes more than the masked model. The thin output is
passed on thin when a single conv/linear reads it (that consumer gathers its input columns), or scattered
back to full width (zeros elsewhere) otherwise. Zero kept channels give a zero-width output; a layer whose
input has zero channels outputs its bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynprune.gates.base import Gate
from dynprune.hooks import apply_mask
from dynprune.runtime.decide import decide, se_gate
from dynprune.runtime.widths import NestedSlots, WidthSlot
from dynprune.runtime.wrap import Wrapper


def conv_out_size(conv: nn.Conv2d, size: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial output size of ``conv`` for spatial input ``size`` (H, W)."""
    if isinstance(conv.padding, str):  # "same" keeps the size (stride 1); "valid" pads nothing
        pad = [(d * (k - 1)) // 2 * 2 if conv.padding == "same" else 0
               for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
    else:
        pad = [2 * p for p in conv.padding]
    return tuple((s + p - d * (k - 1) - 1) // st + 1
                 for s, p, k, d, st in zip(size, pad, conv.kernel_size, conv.dilation, conv.stride, strict=True))


def _take(t: Tensor, index: Tensor, dim: int = 0) -> Tensor:
    """``t.index_select(dim, index)``, as a view when ``index`` is a prefix 0..k-1 (width gates)."""
    k = len(index)
    if k and int(index[-1]) == k - 1:  # sorted and unique (from nonzero), so a prefix
        return t.narrow(dim, 0, k)
    return t.index_select(dim, index)


class ThinLayer(Wrapper):
    """Runs ``layer`` (Conv2d or Linear, BN already folded) on kept channels only; other attributes
    (``stride``, ``padding``, ``weight``, ...) read those of ``layer``.

    Args:
        layer: the folded layer; its weights are gathered per batch, never modified.
        gate: decides this layer's output channels from its input (None: all kept).
        source: the ThinLayer whose thin output this layer reads (None: a full-width input).
        scatter: write the kept channels back into a full-width zero tensor (the output has other readers).
        narrow: the prefix chosen by the enclosing width blocks (None: not narrowed); with a gate too, a
            channel runs when both keep it, as the masked model multiplies both masks.
    """

    wrapped = "layer"

    def __init__(self, layer: nn.Module, gate: Gate | None, source: ThinLayer | None, scatter: bool,
                 narrow: WidthSlot | NestedSlots | None = None) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"ThinLayer runs Conv2d or Linear, got {type(layer).__name__}")
        self.layer, self.gate, self.scatter, self.narrow = layer, gate, scatter, narrow
        object.__setattr__(self, "source", source)  # a reference, not a submodule
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.dim = 1 if self.is_conv else -1
        groups = layer.groups if self.is_conv else 1
        # A depthwise conv thins its input with its output; other grouped convs run dense and mask.
        self.depthwise = groups > 1 and groups == layer.in_channels == layer.out_channels
        self.thinnable = groups == 1 or self.depthwise
        self.out_channels = layer.weight.shape[0]
        self.in_channels = layer.in_channels if self.is_conv else layer.in_features
        per_unit = 1
        if source is not None:
            if self.is_conv and layer.groups != 1:
                raise ValueError(f"a thin input needs groups=1, got groups={layer.groups}")
            if self.in_channels % source.out_channels:
                raise ValueError(f"{self.in_channels} inputs are not a multiple of the source's "
                                 f"{source.out_channels} channels")
            per_unit = self.in_channels // source.out_channels
        self.register_buffer("unit_offsets", torch.arange(per_unit), persistent=False)
        self.kept: Tensor | None = None  # output channels present in the last output (None: all)
        self.pool_dims = (2, 3)
        self.se_gate = isinstance(gate, Gate) and se_gate(gate)

    def input_columns(self) -> Tensor | None:
        """Indices of this layer's inputs present in its (thin) input; None when all are."""
        kept = self.source.kept if self.source is not None else None
        if kept is None or len(self.unit_offsets) == 1:
            return kept
        return (kept[:, None] * len(self.unit_offsets) + self.unit_offsets).flatten()

    def decide(self, x: Tensor, cols: Tensor | None) -> tuple[Tensor, bool]:
        """The decisions (N, C_out) of the gate (from the (thin) input, pooled then scattered to full width) and
        of the width prefix, and whether they are binary (an unforced gate deciding hard: a bool tensor)."""
        prefix = self.narrow.mask() if self.narrow is not None else None
        if self.gate is None:
            return prefix, True
        mask, binary = self.gate_decisions(x, cols)
        if prefix is None:
            return mask, binary
        return (mask & prefix, True) if binary else (mask * prefix.to(mask.dtype), False)

    def gate_decisions(self, x: Tensor, cols: Tensor | None) -> tuple[Tensor, bool]:
        """The gate's decisions (N, C_out) from the (thin) input and whether they are binary."""
        if x.dim() > 2:
            pooled = x.mean(self.pool_dims) if self.is_conv else x.flatten(1, -2).mean(1)
        else:
            pooled = x
        if cols is not None:
            pooled = pooled.new_zeros(pooled.shape[0], self.in_channels).index_copy_(1, cols, pooled)
        return decide(self.gate, pooled, self.se_gate)

    def forward(self, x: Tensor) -> Tensor:
        """Thin or full (N, C_in', ...) -> (N, C_out', ...); ``self.kept`` names the output channels present."""
        cols = self.input_columns()
        weight, bias = self.layer.weight, self.layer.bias
        rows = scale = None
        if self.gate is not None or self.narrow is not None:
            mask, binary = self.decide(x, cols)
            if self.thinnable:
                rows = (mask[0] if len(mask) == 1 else mask.any(0)).nonzero().flatten()
                if len(rows) == self.out_channels:
                    rows = None
                else:
                    weight, bias = _take(weight, rows), _take(bias, rows) if bias is not None else None
            if not (binary and len(mask) == 1 and rows is not None):  # else: a thinned 0/1 row is all ones
                kept = mask if rows is None else mask.index_select(1, rows)
                if not bool(kept.all()) if binary else bool((kept != 1).any()):
                    scale = kept
        if cols is not None:
            weight = _take(weight, cols, dim=1)
        groups = self.layer.groups if self.is_conv else 1
        if self.depthwise and rows is not None:
            x, groups = x.index_select(1, rows), len(rows)
        out = self.run(x, weight, bias, groups)
        if scale is not None:
            out = apply_mask(out, scale.to(out.dtype), self.dim)
        if self.scatter and rows is not None:
            full = list(out.shape)
            full[self.dim] = self.out_channels
            out = out.new_zeros(full).index_copy_(self.dim % out.dim(), rows, out)
            rows = None
        self.kept = rows
        return out

    def run(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        """The layer with the gathered weights; zero output or input channels handled without calling it."""
        n_out, n_in = weight.shape[0], weight.shape[1]
        if n_out and n_in:
            if self.is_conv:
                conv = self.layer
                return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)
            return F.linear(x, weight, bias)
        if self.is_conv:
            shape = (x.shape[0], n_out, *conv_out_size(self.layer, tuple(x.shape[2:])))
        else:
            shape = (*x.shape[:-1], n_out)
        out = x.new_zeros(shape)
        if bias is not None and n_out:  # no input channels: every output is the bias
            out = out + (bias.view(-1, *[1] * (out.dim() - 2)) if self.is_conv else bias)
        return out
