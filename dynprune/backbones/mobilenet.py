"""A MobileNetV2-style net for small images: inverted residuals (expand 1x1, depthwise 3x3, project)."""

from __future__ import annotations

from torch import Tensor, nn

from dynprune.backbones.registry import register_backbone, scale_depth, scale_width

# (expansion t, channels c, repeats n, first stride s), a shortened CIFAR-style schedule.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1)]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> linear project 1x1, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = _conv_bn(cin, hidden, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, act=False)
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        """(N, cin, H, W) -> (N, cout, H/stride, W/stride)."""
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stem conv3 -> inverted residual stages -> conv1x1 -> global pool -> fc."""

    def __init__(self, num_classes: int, in_chans: int, width_mult: float, depth_mult: float) -> None:
        super().__init__()
        channels = scale_width(32, width_mult, 8)
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(in_chans, channels, 3))]
        for t, c, n, s in _SETTINGS:
            out = scale_width(c, width_mult, 8)
            for i in range(scale_depth(n, depth_mult)):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        last = scale_width(320, max(1.0, width_mult), 8)
        layers.append(nn.Sequential(*_conv_bn(channels, last, 1)))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> logits (N, num_classes)."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_backbone("mobilenetv2")
def mobilenetv2(
    num_classes: int, in_chans: int, input_size: int, width_mult: float = 1.0, depth_mult: float = 1.0
) -> nn.Module:
    """MobileNetV2-style net (shortened schedule for 28-32 px inputs)."""
    return MobileNetV2(num_classes, in_chans, width_mult, depth_mult)
