"""LeNet-5 (conv) and LeNet-300-100 (MLP), the classic pruning/compression testbeds."""

from __future__ import annotations

from torch import Tensor, nn

from dynprune.backbones.registry import register_backbone, scale_width


def flat_mlp(*sizes: int) -> nn.Sequential:
    """Flatten -> Linear -> ReLU -> ... -> Linear through ``sizes`` (Linear layers at odd indices)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (cin, cout) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(cin, cout)] + ([nn.ReLU(inplace=True)] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """conv5(c1) -> pool -> conv5(c2) -> pool -> fc ... -> fc; input (N, C, S, S).

    Defaults: the classic 6/16 convs and 120/84 fc with 'same' padding on the first conv (61.7k parameters);
    ``lenet5_caffe`` is Caffe's LeNet that Han et al. compress (20/50 convs, fc 500, no padding: 431k).
    """

    def __init__(self, num_classes: int, in_chans: int, input_size: int, width_mult: float,
                 convs: tuple[int, int] = (6, 16), fcs: tuple[int, ...] = (120, 84), padding: int = 2) -> None:
        super().__init__()
        c1, c2 = (scale_width(c, width_mult) for c in convs)
        hidden = [scale_width(f, width_mult) for f in fcs]
        spatial = ((input_size + 2 * padding - 4) // 2 - 4) // 2
        if spatial < 1:
            raise ValueError(f"lenet5 needs input_size >= {16 - 2 * padding}, got {input_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 5, padding=padding),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = flat_mlp(c2 * spatial * spatial, *hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, S, S) -> logits (N, num_classes)."""
        return self.classifier(self.features(x))


class LeNet300100(nn.Module):
    """MLP 784-300-100-10 of Han et al.; input (N, C, S, S) is flattened."""

    def __init__(self, num_classes: int, in_chans: int, input_size: int, width_mult: float) -> None:
        super().__init__()
        h1, h2 = scale_width(300, width_mult), scale_width(100, width_mult)
        self.net = flat_mlp(in_chans * input_size * input_size, h1, h2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, S, S) -> logits (N, num_classes)."""
        return self.net(x)


@register_backbone("lenet5")
def lenet5(num_classes: int, in_chans: int, input_size: int, width_mult: float = 1.0) -> nn.Module:
    """LeNet-5 with 'same' padding on the first conv (28x28 input as in MNIST practice)."""
    return LeNet5(num_classes, in_chans, input_size, width_mult)


@register_backbone("lenet5_caffe")
def lenet5_caffe(num_classes: int, in_chans: int, input_size: int, width_mult: float = 1.0) -> nn.Module:
    """Caffe's LeNet (20/50 convs, fc 500; 431k parameters at 28x28): the LeNet-5 of Deep Compression."""
    return LeNet5(num_classes, in_chans, input_size, width_mult, convs=(20, 50), fcs=(500,), padding=0)


@register_backbone("lenet300_100")
def lenet300_100(num_classes: int, in_chans: int, input_size: int, width_mult: float = 1.0) -> nn.Module:
    """LeNet-300-100 (Han et al., Deep Compression Table 1)."""
    return LeNet300100(num_classes, in_chans, input_size, width_mult)
