"""Channel-gated execution: a BN-folded conv/linear that computes only the output channels its gate keeps
and reads only the input channels its source layer kept.

Per batch, a gated layer keeps the union of the channels any input keeps (at batch 1: exactly that input's
channels) and multiplies by the mask restricted to them only where inputs disagree; when every channel is
in the union it runs the dense layer, so it never computes more than the masked model. The thin output is
passed on thin when a single conv/linear reads it (that consumer gathers its input columns), or scattered
back to full width (zeros elsewhere) otherwise; a depthwise conv reading a thin input computes only the kept
channels whose input is present (the others output their bias). Zero kept channels are passed on as one
all-zero channel (pooling refuses zero-width tensors; the reader treats it like any absent, zero, channel); a
layer whose input has zero channels outputs its bias. The weights for one (kept rows, present columns) pair
are gathered once into a contiguous pack and cached (LRU, bounded), so a repeated mask costs no gather. The gate
runs as a :class:`~dynprune.runtime.decide.HardRule` (its SE net and the family's threshold, no module calls) and
the per-call path reads plain references only (no ``nn.Module.__getattr__``).
``set_masked(True)`` switches a layer to the masked path (see :mod:`dynprune.runtime.dispatch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynprune.gates.base import Gate
from dynprune.runtime.decide import HardRule, decide, se_gate
from dynprune.runtime.layout import zeros_in_layout
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


@dataclass
class Pack:
    """What one layer runs for one set of kept output rows and present input columns (cached per mask).

    ``rows``: kept output channels (None: all). A depthwise conv reading a thin input computes only the kept
    rows whose input is present (``x_index``: their positions in the input, None: all of it); the other kept
    rows are its bias, written around the computed ones (``fill``: (their positions, the bias of ``rows``)).
    """

    weight: Tensor
    bias: Tensor | None
    rows: Tensor | None
    groups: int
    x_index: Tensor | None = None
    fill: tuple[Tensor, Tensor] | None = None

    @property
    def numel(self) -> int:
        """Elements held (the cache budget counts them)."""
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)


class ThinLayer(Wrapper):
    """Runs ``layer`` (Conv2d or Linear, BN already folded) on kept channels only; other attributes
    (``stride``, ``padding``, ``weight``, ...) read those of ``layer``.

    Args:
        layer: the folded layer; never modified. The weights it runs for a mask (kept rows, present input
            columns) are gathered once into a contiguous :class:`Pack` and cached, least recently used first
            out, up to ``cache_factor`` times the layer's weight size: a trained gate repeats few masks, so a
            call usually gathers nothing (a cycle through more masks than fit would miss every time).
        gate: decides this layer's output channels from its input (None: all kept).
        source: the ThinLayer whose thin output this layer reads (None: a full-width input).
        scatter: write the kept channels back into a full-width zero tensor (the output has other readers).
        narrow: the prefix chosen by the enclosing width blocks (None: not narrowed); with a gate too, a
            channel runs when both keep it, as the masked model multiplies both masks.
    """

    wrapped = "layer"
    cache_factor = 16

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
            if self.is_conv and layer.groups != 1 and not self.depthwise:
                raise ValueError(f"a thin input needs groups=1 or a depthwise conv, got groups={layer.groups}")
            if self.in_channels % source.out_channels:
                raise ValueError(f"{self.in_channels} inputs are not a multiple of the source's "
                                 f"{source.out_channels} channels")
            per_unit = self.in_channels // source.out_channels
        self.register_buffer("unit_offsets", torch.arange(per_unit), persistent=False)
        self.kept: Tensor | None = None  # output channels present in the last output (None: all)
        self.key: bytes | None = None  # identifies ``kept`` for the consumer's cache (None: all)
        self.packs: dict[tuple[bytes | None, bytes | None], Pack] = {}
        self.cached = 0
        self.pool_dims = (2, 3)
        self.se_gate = isinstance(gate, Gate) and se_gate(gate)
        self.__dict__["masked"] = False  # the masked path: every output channel computed, then masked
        self._refresh()

    def set_masked(self, on: bool) -> None:
        """Take the masked path (``on``: run the dense folded layer and multiply by the mask, as the masked model
        does) or the thin path (compute only the kept channels); both give the same outputs."""
        self.__dict__["masked"] = on

    def _refresh(self) -> None:
        """Plain references for the per-call path (module attributes go through ``nn.Module.__getattr__``)."""
        layer, gate = self.layer, self.gate
        plain = self.__dict__
        plain["_gate"], plain["_narrow"] = gate, self.narrow
        plain["_conv"] = (layer.stride, layer.padding, layer.dilation) if self.is_conv else None
        plain["_rule"] = HardRule(gate) if self.se_gate else None
        # forward's batch-1 path: an SE gate's hard rule alone decides, on a layer that thins its output
        plain["_single"] = self.se_gate and self.narrow is None and self.thinnable
        plain["_offsets"] = self.unit_offsets
        plain["_on_cpu"] = layer.weight.device.type == "cpu"

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """Casting or moving the layer drops the cached packs (they were gathered from the old weights)."""
        self.clear_cache()
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def clear_cache(self) -> None:
        """Drop every cached :class:`Pack` (e.g. those of the forced masks a build check ran)."""
        self.packs.clear()
        self.cached = 0

    def input_columns(self) -> Tensor | None:
        """Indices of this layer's inputs present in its (thin) input; None when all are."""
        plain = self.__dict__
        source, offsets = plain["source"], plain["_offsets"]
        kept = source.kept if source is not None else None
        if kept is None or len(offsets) == 1:
            return kept
        return (kept[:, None] * len(offsets) + offsets).flatten()

    def decide(self, x: Tensor, cols: Tensor | None) -> tuple[Tensor, bool]:
        """The decisions (N, C_out) of the gate (from the (thin) input, pooled then scattered to full width) and
        of the width prefix, and whether they are binary (an unforced gate deciding hard: a bool tensor)."""
        plain = self.__dict__
        narrow = plain["_narrow"]
        prefix = narrow.mask() if narrow is not None else None
        if plain["_gate"] is None:
            return prefix, True
        mask, binary = self.gate_decisions(x, cols)
        if prefix is None:
            return mask, binary
        return (mask & prefix, True) if binary else (mask * prefix.to(mask.dtype), False)

    def gate_decisions(self, x: Tensor, cols: Tensor | None) -> tuple[Tensor, bool]:
        """The gate's decisions (N, C_out) from the (thin) input and whether they are binary."""
        pooled = self.pooled(x)
        if cols is not None:
            pooled = pooled.new_zeros(pooled.shape[0], self.in_channels).index_copy_(1, cols, pooled)
        plain = self.__dict__
        gate, rule = plain["_gate"], plain["_rule"]
        if rule is not None and gate.forced is None and gate.hard:
            return rule(pooled), True
        return decide(gate, pooled, self.se_gate)

    def forward(self, x: Tensor) -> Tensor:
        """Thin or full (N, C_in', ...) -> (N, C_out', ...); ``self.kept`` names the output channels present."""
        plain = self.__dict__
        source = plain["source"]
        cols = None if source is None else self.input_columns()
        if (x.shape[0] == 1 and plain["_single"] and not plain["masked"] and plain["_gate"].forced is None
                and plain["_gate"].hard):  # one input, an SE gate deciding hard: its mask is the union, no scale
            mask = self.gate_decisions(x, cols)[0]
            key = self.cache_key(mask)
            return self.run(x, self.pack(key, mask, cols), None, key)
        mask = union = scale = None
        binary = True
        if plain["_gate"] is not None or plain["_narrow"] is not None:
            mask, binary = self.decide(x, cols)
            if self.thinnable and not plain["masked"]:
                union = mask[0] if mask.shape[0] == 1 else mask.any(0)
                union = union if binary else union != 0
        key = self.cache_key(union)
        pack = self.pack(key, union, cols)
        if mask is not None and not (binary and mask.shape[0] == 1 and pack.rows is not None):
            kept = mask if pack.rows is None else mask.index_select(1, pack.rows)  # inputs disagree, or soft
            if not bool(kept.all()) if binary else bool((kept != 1).any()):
                scale = kept
        return self.run(x, pack, scale, key)

    def pooled(self, x: Tensor) -> Tensor:
        """What the gate reads: the (thin) input averaged over its spatial or token positions, (N, C_in')."""
        if x.dim() > 2:
            return x.mean(self.pool_dims) if self.is_conv else x.flatten(1, -2).mean(1)
        return x

    def run(self, x: Tensor, pack: Pack, scale: Tensor | None, key: bytes | None) -> Tensor:
        """The layer with ``pack``'s weights on ``x``, masked by ``scale`` (N, kept) where inputs disagree, written
        back to full width if this layer scatters; records ``kept`` and ``key`` for the reader."""
        plain = self.__dict__
        if pack.x_index is not None:
            x = x.index_select(1, pack.x_index)
        conv = plain["_conv"]
        weight = pack.weight
        if weight.shape[0] and weight.shape[1] and x.shape[self.dim]:
            out = (F.conv2d(x, weight, pack.bias, *conv, pack.groups) if conv is not None
                   else F.linear(x, weight, pack.bias))
        else:
            out = self.empty_run(x, weight, pack.bias)
        if pack.fill is not None:
            index, bias = pack.fill
            full = bias.view(1, -1, 1, 1).expand(out.shape[0], -1, *out.shape[2:]).contiguous()
            out = full.index_copy_(1, index, out)
        if scale is not None:  # ``out`` is this call's own tensor: masked in place, no copy of the output
            shape = [1] * out.dim()
            shape[0], shape[self.dim % out.dim()] = scale.shape
            out = out.mul_(scale.to(out.dtype).reshape(shape))
        rows = pack.rows
        if self.scatter and rows is not None:
            full_shape = list(out.shape)
            full_shape[self.dim] = self.out_channels
            out = zeros_in_layout(out, full_shape).index_copy_(self.dim % out.dim(), rows, out)
            rows = key = None
        elif rows is not None and rows.shape[0] == 0:  # ops before the reader (pooling) refuse zero channels
            one = list(out.shape)
            one[self.dim] = 1
            out, rows = out.new_zeros(one), self.unit_offsets[:1]
        plain["kept"], plain["key"] = rows, key
        return out

    def cache_key(self, union: Tensor | None) -> bytes | None:
        """Bytes naming a (C_out,) or (1, C_out) bool union of kept channels; None: no mask."""
        if union is None:
            return None
        return (union if self._on_cpu else union.cpu()).numpy().tobytes()

    def pack(self, rows_key: bytes | None, union: Tensor | None, cols: Tensor | None) -> Pack:
        """The cached :class:`Pack` for this union of kept rows (named by ``rows_key``) and the source's
        present columns."""
        source = self.__dict__["source"]
        key = (rows_key, None if source is None else source.key)
        found = self.packs.pop(key, None)
        if found is None:
            found = self.gather(union, cols)
            budget = self.cache_factor * self.layer.weight.numel()
            while self.packs and self.cached + found.numel > budget:
                self.cached -= self.packs.pop(next(iter(self.packs))).numel
            if found.numel <= budget:
                self.cached += found.numel
            else:
                return found
        self.packs[key] = found  # (re)inserted last: the most recently used
        return found

    def gather(self, union: Tensor | None, cols: Tensor | None) -> Pack:
        """Gather the weights for kept ``union`` (C_out,) or (1, C_out) bool (None: all) and present input ``cols``."""
        weight, bias = self.layer.weight, self.layer.bias
        groups = self.layer.groups if self.is_conv else 1
        rows = None if union is None else union.reshape(-1).nonzero().flatten()
        if rows is not None and len(rows) == self.out_channels:
            rows = None
        if self.depthwise:
            return self.gather_depthwise(rows, cols)
        if rows is not None:
            weight, bias = _take(weight, rows), _take(bias, rows) if bias is not None else None
        if cols is not None:
            weight = _take(weight, cols, dim=1)
        return Pack(weight.contiguous(), bias.contiguous() if bias is not None else None, rows, groups)

    def gather_depthwise(self, rows: Tensor | None, cols: Tensor | None) -> Pack:
        """A depthwise conv computes the kept ``rows`` whose input channel is among ``cols``; the other kept
        rows read an all-zero input channel and output their bias."""
        weight, bias = self.layer.weight, self.layer.bias
        n = self.out_channels
        everything = torch.arange(n, device=weight.device)
        out_set = everything if rows is None else rows
        if cols is None:
            both, x_index = out_set, rows
        else:
            present = torch.zeros(n, dtype=torch.bool, device=weight.device)
            present[cols] = True
            both = out_set[present[out_set]]
            position = torch.full((n,), -1, dtype=torch.long, device=weight.device)
            position[cols] = torch.arange(len(cols), device=weight.device)
            x_index = position[both]
            if len(x_index) == len(cols):  # every present column is computed, in order
                x_index = None
        fill = None
        if len(both) < len(out_set):
            position = torch.full((n,), -1, dtype=torch.long, device=weight.device)
            position[out_set] = torch.arange(len(out_set), device=weight.device)
            full_bias = bias[out_set] if bias is not None else weight.new_zeros(len(out_set))
            fill = (position[both], full_bias.contiguous())
        return Pack(weight[both].contiguous(), bias[both].contiguous() if bias is not None else None, rows,
                    len(both), x_index, fill)

    def empty_run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's output when it has zero output or input channels (or an empty input), without calling it:
        zeros, or the bias where there are outputs but no inputs."""
        n_out = weight.shape[0]
        if self.is_conv:
            shape = (x.shape[0], n_out, *conv_out_size(self.layer, tuple(x.shape[2:])))
        else:
            shape = (*x.shape[:-1], n_out)
        out = x.new_zeros(shape)
        if bias is not None and n_out:  # no input channels: every output is the bias
            out = out + (bias.view(-1, *[1] * (out.dim() - 2)) if self.is_conv else bias)
        return out
