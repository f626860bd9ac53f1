"""The backbone registries: ``@register_backbone("name")`` on an image model's factory taking ``num_classes``,
``in_chans``, ``input_size`` and, as keywords, only the options it supports (``width_mult``, ``depth_mult``,
...); ``@register_language_model("name")`` on a token model's factory taking ``vocab_size``, ``block_size`` and
its options. Two registries, because a language model takes token ids (N, T), not images (N, C, S, S)."""

from __future__ import annotations

import math

from torch import nn

from dynprune.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")
register_backbone = BACKBONES.register
LANGUAGE_MODELS: Registry[nn.Module] = Registry("language model")
register_language_model = LANGUAGE_MODELS.register


def scale_width(channels: int, width_mult: float, divisor: int = 1) -> int:
    """EfficientNet-style width scaling, rounded to a multiple of ``divisor`` (at least ``divisor``)."""
    scaled = channels * width_mult
    return max(divisor, int(scaled + divisor / 2) // divisor * divisor)


def scale_depth(repeats: int, depth_mult: float) -> int:
    """EfficientNet-style depth scaling: ceil(repeats * depth_mult), at least 1."""
    return max(1, math.ceil(repeats * depth_mult))
