"""Slimmable layers: a conv/linear that runs on a prefix of its channels, and switchable BatchNorm.

A slimmable layer keeps one full weight tensor. Its input width is whatever arrives (the first
``x.shape[1]`` input channels are used); its output width is ``out_active`` (None = all). A depthwise
conv follows its input: ``c`` input channels give ``c`` output channels.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SlimmableConv2d(nn.Conv2d):
    """Conv2d on the first ``x.shape[1]`` input and ``out_active`` output channels of one weight."""

    out_active: int | None = None
    in_active: int | None = None  # input width of the last call, for exporting thin weights

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> SlimmableConv2d:
        """A slimmable conv sharing ``conv``'s parameters (depthwise or ungrouped convs only)."""
        if conv.groups not in (1, conv.in_channels) or (conv.groups > 1 and conv.out_channels != conv.in_channels):
            raise ValueError(f"only ungrouped or depthwise convs can be slimmed, got groups={conv.groups} "
                             f"for {conv.in_channels}->{conv.out_channels} channels")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' to slim a conv, got {conv.padding_mode!r}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, device=conv.weight.device,
                  dtype=conv.weight.dtype)
        new.weight, new.bias = conv.weight, conv.bias
        return new

    @property
    def depthwise(self) -> bool:
        """True when every output channel reads one input channel."""
        return self.groups > 1

    def sliced(self, cin: int) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) used for ``cin`` input channels: (c_out, c_in / groups, k, k), (c_out,)."""
        out = cin if self.depthwise else self.out_active or self.out_channels
        weight = self.weight[:out] if self.depthwise else self.weight[:out, :cin]
        return weight, self.bias[:out] if self.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        """(N, c_in, H, W) -> (N, c_out, H', W'); c_out = c_in if depthwise else ``out_active``."""
        self.in_active = x.shape[1]
        weight, bias = self.sliced(x.shape[1])
        groups = x.shape[1] if self.depthwise else 1
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)


class SlimmableLinear(nn.Linear):
    """Linear on the first ``x.shape[-1]`` input and ``out_active`` output features of one weight."""

    out_active: int | None = None
    in_active: int | None = None

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> SlimmableLinear:
        """A slimmable linear sharing ``linear``'s parameters."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def sliced(self, cin: int) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) used for ``cin`` input features: (f_out, f_in), (f_out,)."""
        out = self.out_active or self.out_features
        return self.weight[:out, :cin], self.bias[:out] if self.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        """(N, f_in) -> (N, f_out); a flattened (N, c, H, W) is a prefix of the full flattening."""
        self.in_active = x.shape[-1]
        return F.linear(x, *self.sliced(x.shape[-1]))


class SwitchableBatchNorm2d(nn.Module):
    """One private BatchNorm2d (statistics and affine) per width; ``active`` picks the one in use."""

    def __init__(self, bns: list[nn.BatchNorm2d]) -> None:
        super().__init__()
        self.bns = nn.ModuleList(bns)
        self.active = len(bns) - 1

    @classmethod
    def from_dense(cls, bn: nn.BatchNorm2d, sizes: list[int]) -> SwitchableBatchNorm2d:
        """One BN per entry of ``sizes``, each starting from the first channels of ``bn``."""
        if type(bn) is not nn.BatchNorm2d:
            raise ValueError(f"only nn.BatchNorm2d can be made switchable, got {type(bn).__name__}")
        return cls([prefix_bn(bn, size) for size in sizes])

    def add(self, bn: nn.BatchNorm2d) -> int:
        """Append a BN for a new width; returns its index."""
        self.bns.append(bn)
        return len(self.bns) - 1

    def forward(self, x: Tensor) -> Tensor:
        """(N, c, H, W) -> (N, c, H, W) with the active width's BN (c must be its size)."""
        bn = self.bns[self.active]
        if x.shape[1] != bn.num_features:
            raise RuntimeError(f"switchable BN {self.active} has {bn.num_features} channels, "
                               f"got an input with {x.shape[1]}")
        return bn(x)


def prefix_bn(bn: nn.BatchNorm2d, size: int) -> nn.BatchNorm2d:
    """A new BatchNorm2d of ``size`` channels holding a copy of the first ``size`` of ``bn``'s state."""
    new = nn.BatchNorm2d(size, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device if bn.affine else None)
    state = {k: v[:size] if v.ndim else v for k, v in bn.state_dict().items()}
    new.load_state_dict(state)
    return new
