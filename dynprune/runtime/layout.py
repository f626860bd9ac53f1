"""Memory layouts of image activations at inference: NCHW (``contiguous``) or NHWC (``channels_last``).

The dispatch plan (:mod:`dynprune.runtime.dispatch`) times both per batch size and converts the input; convolutions
then keep the layout of their input. Two places would drop it, and are handled here: a tensor with one channel is
both layouts at once, so a convolution reading one (a grey-scale stem) falls back to NCHW
(:class:`LayoutSeed` converts its output), and a new full-width tensor written around kept channels is NCHW unless
made otherwise (:func:`zeros_in_layout`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynprune.runtime.fold import set_submodule
from dynprune.runtime.wrap import Wrapper


def is_channels_last(t: Tensor) -> bool:
    """Whether ``t`` is a 4-d tensor laid out channels-last (and not also contiguous NCHW)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def zeros_in_layout(like: Tensor, shape: list[int]) -> Tensor:
    """Zeros of ``shape`` in the memory layout of ``like``: a channels-last image stays channels-last, so the layers
    after a scatter keep running in the layout the dispatch plan chose."""
    if is_channels_last(like):
        n, c, h, w = shape
        return like.new_zeros((n, h, w, c)).permute(0, 3, 1, 2)
    return like.new_zeros(shape)


class LayoutSeed(Wrapper):
    """A convolution whose input has one channel, so no layout of its own: in the channels-last layout
    (``set_layout``), its output is converted, and the layers after it run channels-last as planned."""

    wrapped = "conv"

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.__dict__["channels_last"] = False

    def set_layout(self, layout: str) -> None:
        """``channels_last`` or ``contiguous``: the layout the compiled model runs in from the next call."""
        self.__dict__["channels_last"] = layout == "channels_last"

    def forward(self, x: Tensor) -> Tensor:
        """The convolution, its output channels-last when the model runs channels-last."""
        out = self.conv(x)
        return out.contiguous(memory_format=torch.channels_last) if self.__dict__["channels_last"] else out


def seed_layouts(net: nn.Module) -> list[str]:
    """Wrap every plain ``Conv2d`` of ``net`` that reads one channel in a :class:`LayoutSeed` (in place; not those
    an executor runs, e.g. a :class:`~dynprune.runtime.channels.ThinLayer`'s own); returns their names."""
    modules = dict(net.named_modules())
    names = [name for name, m in modules.items()
             if name and type(m) is nn.Conv2d and m.in_channels == 1 and m.groups == 1
             and not isinstance(modules[name.rpartition(".")[0]], Wrapper)]
    for name in names:
        set_submodule(net, name, LayoutSeed(net.get_submodule(name)))
    return names
