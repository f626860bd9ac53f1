"""Slimmable networks: one supernet, many widths (switchable BN, sandwich rule, in-place distillation).

Example::

    net = dp.slimmable.make_slimmable(dp.backbones.create("resnet20"), widths=[0.25, 0.5, 1.0])
    dp.slimmable.set_width(net, 0.5)
    dp.slimmable.calibrate_bn(net, 0.375, train_loader)  # a width outside the list
"""

from dynprune.slimmable.calibrate import calibrate_bn
from dynprune.slimmable.convert import (
    DEFAULT_WIDTHS,
    SlimSpec,
    ThinBackbone,
    channels_at,
    export_thin,
    make_slimmable,
    set_width,
    spec_of,
)
from dynprune.slimmable.layers import SlimmableConv2d, SlimmableLinear, SwitchableBatchNorm2d
from dynprune.slimmable.module import SlimmableClassifier

__all__ = [
    "DEFAULT_WIDTHS", "SlimSpec", "SlimmableClassifier", "SlimmableConv2d", "SlimmableLinear",
    "SwitchableBatchNorm2d", "ThinBackbone", "calibrate_bn", "channels_at", "export_thin", "make_slimmable",
    "set_width", "spec_of",
]
