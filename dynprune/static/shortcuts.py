"""Zero-padding (option A) ResNet shortcuts as modules that Torch-Pruning can follow.

An option-A shortcut subsamples its input and pads it with zero channels (``F.pad`` over channels), an
op whose channel map Torch-Pruning does not know, so the residual stream of a CIFAR ResNet could not
be pruned. ``explicit_shortcuts`` installs a ``ChannelPad`` (same function, no parameters) as the
block's ``downsample``, and ``ChannelPadPruner`` tells Torch-Pruning how its channels map: output
channel ``j`` copies input channel ``src[j]`` (or is zero where ``src[j] < 0``), so a removed input
channel leaves a zero output channel, and an output channel can be removed by itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from dynprune.backbones.resnet_cifar import BasicBlock


class ChannelPad(nn.Module):
    """(N, C_in, H, W) -> (N, len(src), H / stride, W / stride): ``out[:, j] = x[:, src[j], ::stride, ::stride]``,
    zero where ``src[j] < 0``; ``src`` is a buffer, so a pruned shortcut survives ``state_dict``."""

    def __init__(self, src: Sequence[int], in_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels, self.stride = in_channels, stride
        self.register_buffer("src", torch.as_tensor(list(src), dtype=torch.long))

    def _padding(self) -> tuple[int, int] | None:
        """(zeros before, zeros after) when ``src`` is ``-1 ... 0, 1, ..., C_in - 1 ... -1``, else None."""
        kept = (self.src >= 0).nonzero().flatten()
        before = int(kept[0]) if len(kept) else 0
        if len(kept) != self.in_channels or not torch.equal(self.src[kept], torch.arange(self.in_channels)) \
                or not torch.equal(kept, torch.arange(before, before + len(kept))):
            return None
        return before, len(self.src) - before - len(kept)

    def forward(self, x: Tensor) -> Tensor:
        """Subsample, then place input channels at their output positions (``F.pad`` when contiguous)."""
        x = x[:, :, :: self.stride, :: self.stride]
        padding = self._padding()
        if padding is not None:
            return F.pad(x, (0, 0, 0, 0, *padding))
        out = x.new_zeros(x.shape[0], len(self.src), *x.shape[2:])
        kept = (self.src >= 0).nonzero().flatten()
        out[:, kept] = x[:, self.src[kept]]
        return out


class ChannelPadPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning's pruning functions for ``ChannelPad``: input and output channels are separate groups."""

    TARGET_MODULE = ChannelPad

    def prune_out_channels(self, layer: ChannelPad, idxs: Sequence[int]) -> ChannelPad:
        keep = torch.ones(len(layer.src), dtype=torch.bool)
        keep[list(idxs)] = False
        layer.src = layer.src[keep]
        return layer

    def prune_in_channels(self, layer: ChannelPad, idxs: Sequence[int]) -> ChannelPad:
        removed = torch.zeros(layer.in_channels, dtype=torch.bool)
        removed[list(idxs)] = True
        shift = torch.cumsum(removed.long(), 0)  # removed channels at or before each input channel
        valid = layer.src >= 0
        src = layer.src.clone()
        src[valid] = torch.where(removed[layer.src[valid]], -1, layer.src[valid] - shift[layer.src[valid]])
        layer.src, layer.in_channels = src, layer.in_channels - len(idxs)
        return layer

    def get_out_channels(self, layer: ChannelPad) -> int:
        return len(layer.src)

    def get_in_channels(self, layer: ChannelPad) -> int:
        return layer.in_channels


def explicit_shortcuts(model: nn.Module) -> nn.Module:
    """Give every option-A (zero-padding) shortcut of ``model`` a ``ChannelPad`` (in place; same function)."""
    for block in model.modules():
        if isinstance(block, BasicBlock) and block.downsample is None and (block.stride != 1 or block.pad):
            planes_in = block.conv1.in_channels
            before = block.pad // 2
            src = [-1] * before + list(range(planes_in)) + [-1] * (block.pad - before)
            block.downsample = ChannelPad(src, planes_in, block.stride)
    return model


def sync_shortcut_widths(model: nn.Module) -> nn.Module:
    """Set each ``ChannelPad``'s input width from its block's first conv (after loading resized weights)."""
    for block in model.modules():
        if isinstance(block, BasicBlock) and isinstance(block.downsample, ChannelPad):
            block.downsample.in_channels = block.conv1.weight.shape[1]
    return model


def zero_out_channels(module: nn.Module, rows: Tensor) -> bool:
    """Mask output ``rows`` of a parameter-free ``ChannelPad`` (they become zero channels); False for any
    other module."""
    if not isinstance(module, ChannelPad):
        return False
    module.src[rows] = -1
    return True


CUSTOMIZED_PRUNERS = {ChannelPad: ChannelPadPruner()}
