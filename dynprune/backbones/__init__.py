"""Backbones by name: ``create("resnet20", num_classes=10, in_chans=1)``; ``list_backbones()``."""

from __future__ import annotations

from torch import nn

from dynprune.backbones import lenet, mobilenet, resnet_cifar, vgg  # noqa: F401  (registers)
from dynprune.backbones.registry import BACKBONES, register_backbone


def create(
    name: str,
    num_classes: int = 10,
    in_chans: int = 1,
    input_size: int = 28,
    width_mult: float = 1.0,
    depth_mult: float = 1.0,
    **kwargs: object,
) -> nn.Module:
    """Build backbone ``name``; the model records ``input_shape = (in_chans, input_size, input_size)``."""
    if num_classes < 1 or in_chans < 1 or input_size < 1:
        raise ValueError(
            f"num_classes, in_chans and input_size must be >= 1, got "
            f"{num_classes}, {in_chans}, {input_size}"
        )
    if width_mult <= 0 or depth_mult <= 0:
        raise ValueError(f"width_mult and depth_mult must be > 0, got {width_mult}, {depth_mult}")
    model = BACKBONES.get(name)(
        num_classes=num_classes,
        in_chans=in_chans,
        input_size=input_size,
        width_mult=width_mult,
        depth_mult=depth_mult,
        **kwargs,
    )
    model.input_shape = (in_chans, input_size, input_size)
    return model


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return BACKBONES.names()


__all__ = ["create", "list_backbones", "register_backbone"]
