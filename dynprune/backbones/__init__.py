"""Backbones by name: ``create("resnet20", num_classes=10, in_chans=1)``, ``list_backbones()``; language models:
``create_language_model("char_gpt", vocab_size=65, block_size=256)``, ``list_language_models()``."""

from __future__ import annotations

import inspect

from torch import nn

from dynprune.backbones import gpt, lenet, mobilenet, resnet_cifar, vgg, vit  # noqa: F401  (registers)
from dynprune.backbones.registry import BACKBONES, LANGUAGE_MODELS, register_backbone, register_language_model
from dynprune.registry import Registry


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
    options = {k: v for k, v in (("width_mult", width_mult), ("depth_mult", depth_mult)) if v != 1.0}
    options.update(kwargs)
    _check_options(BACKBONES, name, options)
    model = BACKBONES.get(name)(num_classes=num_classes, in_chans=in_chans, input_size=input_size, **options)
    model.input_shape = (in_chans, input_size, input_size)
    return model


def create_language_model(name: str, vocab_size: int, block_size: int, **kwargs: object) -> nn.Module:
    """Build language model ``name`` over ``vocab_size`` tokens with a context of ``block_size``; an option its
    factory lacks is a ValueError naming the language models that take it."""
    _check_options(LANGUAGE_MODELS, name, kwargs)
    return LANGUAGE_MODELS.get(name)(vocab_size=vocab_size, block_size=block_size, **kwargs)


def _check_options(registry: Registry[nn.Module], name: str, options: dict[str, object]) -> None:
    """Every option must be a keyword argument of the factory of ``name`` (an unknown name lists the valid ones)."""
    for key, value in options.items():
        if key not in _arguments(registry, name):
            takers = [n for n in registry.names() if key in _arguments(registry, n)]
            raise ValueError(f"{registry.kind} '{name}' does not support {key}={value!r}; {registry.kind}s that "
                             f"do: {', '.join(takers) or 'none'}")


def _arguments(registry: Registry[nn.Module], name: str) -> set[str]:
    """Keyword arguments the factory of ``name`` accepts."""
    return set(inspect.signature(registry.get(name)).parameters)


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return BACKBONES.names()


def list_language_models() -> list[str]:
    """Names of every registered language model."""
    return LANGUAGE_MODELS.names()


__all__ = ["create", "create_language_model", "list_backbones", "list_language_models", "register_backbone",
           "register_language_model"]
