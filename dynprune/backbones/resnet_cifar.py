"""CIFAR-style ResNets (He et al. 2016, sec. 4.2): 6n+2 layers, widths 16/32/64, BasicBlocks."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dynprune.backbones.registry import register_backbone, scale_depth, scale_width


class BasicBlock(nn.Module):
    """conv3-bn-relu-conv3-bn + shortcut; option 'A' zero-pads, 'B' projects with conv1x1-bn."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes
        self.downsample: nn.Module | None = None
        if (stride != 1 or in_planes != planes) and shortcut == "B":
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def shortcut(self, x: Tensor) -> Tensor:
        """Identity, strided zero-padding (option A) or the projection (option B)."""
        if self.downsample is not None:
            return self.downsample(x)
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, planes, H/stride, W/stride)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv3(16) -> 3 stages of n BasicBlocks (16, 32, 64 ch) -> global pool -> fc."""

    def __init__(
        self, depth: int, num_classes: int, in_chans: int, width_mult: float, depth_mult: float,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        blocks = scale_depth((depth - 2) // 6, depth_mult)
        widths = [scale_width(w, width_mult) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            layers = []
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> logits (N, num_classes)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _factory(depth: int):
    def build(
        num_classes: int, in_chans: int, input_size: int, width_mult: float = 1.0, depth_mult: float = 1.0,
        shortcut: str = "A",
    ) -> nn.Module:
        return CifarResNet(depth, num_classes, in_chans, width_mult, depth_mult, shortcut)

    build.__doc__ = f"CIFAR ResNet-{depth} (shortcut 'A' zero-pad or 'B' projection)."
    return build


resnet20 = register_backbone("resnet20")(_factory(20))
resnet56 = register_backbone("resnet56")(_factory(56))
