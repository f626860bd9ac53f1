"""Backbones by name: ``create("resnet20", num_classes=10, in_chans=1)``; ``list_backbones()``."""

from __future__ import annotations

import inspect

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
    """Build backbone ``name``; the model records ``input_shape = (in_chans, input_size, input_size)``.

    ``width_mult`` / ``depth_mult`` at 1.0 are no-ops for any backbone; other values and extra ``kwargs``
    go to the factory, and an argument its signature lacks is a ValueError naming the backbones that take it.
    """
    if num_classes < 1 or in_chans < 1 or input_size < 1:
        raise ValueError(
            f"num_classes, in_chans and input_size must be >= 1, got "
            f"{num_classes}, {in_chans}, {input_size}"
        )
    if width_mult <= 0 or depth_mult <= 0:
        raise ValueError(f"width_mult and depth_mult must be > 0, got {width_mult}, {depth_mult}")
    factory = BACKBONES.get(name)
    options = {k: v for k, v in (("width_mult", width_mult), ("depth_mult", depth_mult)) if v != 1.0}
    options.update(kwargs)
    for key, value in options.items():
        if key not in _arguments(name):
            takers = [n for n in list_backbones() if key in _arguments(n)]
            raise ValueError(f"backbone '{name}' does not support {key}={value!r}; backbones that do: "
                             f"{', '.join(takers) or 'none'}")
    model = factory(num_classes=num_classes, in_chans=in_chans, input_size=input_size, **options)
    model.input_shape = (in_chans, input_size, input_size)
    return model


def _arguments(name: str) -> set[str]:
    """Keyword arguments the factory of backbone ``name`` accepts."""
    return set(inspect.signature(BACKBONES.get(name)).parameters)


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return BACKBONES.names()


__all__ = ["create", "list_backbones", "register_backbone"]
