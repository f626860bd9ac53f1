"""VGG-11/16 with BatchNorm for small images (CIFAR-style: one fc classifier)."""

from __future__ import annotations

from torch import Tensor, nn

from dynprune.backbones.registry import register_backbone, scale_width

# Each inner list is a stage of 3x3 convs followed by a 2x2 max-pool.
_CFGS = {
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


class VGG(nn.Module):
    """conv3-bn-relu stages with ceil-mode pooling (so 28x28 works) -> global pool -> fc."""

    def __init__(self, depth: int, num_classes: int, in_chans: int, width_mult: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for stage in _CFGS[depth]:
            for width in stage:
                out = scale_width(width, width_mult)
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                           nn.ReLU(inplace=True)]
                channels = out
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> logits (N, num_classes)."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_backbone("vgg11")
def vgg11(num_classes: int, in_chans: int, input_size: int, width_mult: float = 1.0) -> nn.Module:
    """VGG-11 (BN)."""
    return VGG(11, num_classes, in_chans, width_mult)


@register_backbone("vgg16")
def vgg16(num_classes: int, in_chans: int, input_size: int, width_mult: float = 1.0) -> nn.Module:
    """VGG-16 (BN)."""
    return VGG(16, num_classes, in_chans, width_mult)
