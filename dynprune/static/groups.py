"""Channel groups: which parameters are coupled to one output channel of a conv / linear layer.

Removing output unit ``c`` of ``producer`` means also removing entry ``c`` of the producer's bias, of
the normalization right after it, and the inputs of ``consumer`` that read channel ``c``. Structured
pruning masks all of them together (so a pruned channel is exactly zero, also after BatchNorm), and
physical channel removal slices all of them together.

Supported: chain nets (the root's descendants are ``nn.Sequential`` containers and the leaf types in
``CHAIN_LEAVES``, run in registration order: LeNet-5, LeNet-300-100, VGG) and residual nets built of
``BasicBlock`` (only each block's inner channels, conv1 -> bn1 -> conv2, are grouped, so the
residual-coupled block outputs keep their width).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dynprune.backbones.resnet_cifar import BasicBlock

CHAIN_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity,
)


@dataclass(frozen=True)
class ChannelGroup:
    """Output units of ``producer`` with the coupled ``norm`` and ``consumer`` inputs (module names).

    ``per_unit`` consumer inputs read each producer unit (H*W when a conv feeds a linear via flatten).
    """

    producer: str
    norm: str | None
    consumer: str
    per_unit: int = 1


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The prunable channel groups of ``model``, in forward order; ValueError for unsupported nets."""
    blocks = [name for name, m in model.named_modules() if isinstance(m, BasicBlock)]
    if blocks:
        return [ChannelGroup(f"{b}.conv1", f"{b}.bn1", f"{b}.conv2") for b in blocks]
    return _chain_groups(model)


def _chain_groups(model: nn.Module) -> list[ChannelGroup]:
    """Groups of a chain net: each conv/linear feeds the next conv/linear through channel-wise layers."""
    leaves: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        children = list(m.children())
        if m is not model and children and not isinstance(m, nn.Sequential):
            raise ValueError(
                f"cannot group channels of {type(m).__name__} ('{name}'): supported are chain nets "
                f"(nn.Sequential of {', '.join(t.__name__ for t in CHAIN_LEAVES)}) and nets of BasicBlock"
            )
        if not children:
            if not isinstance(m, CHAIN_LEAVES) or (isinstance(m, nn.Conv2d) and m.groups != 1):
                raise ValueError(
                    f"cannot group channels through {m!r} ('{name}'); chain nets may hold only "
                    f"{', '.join(t.__name__ for t in CHAIN_LEAVES)} (convs with groups=1)"
                )
            leaves.append((name, m))
    weighted = [i for i, (_, m) in enumerate(leaves) if isinstance(m, (nn.Conv2d, nn.Linear))]
    groups = []
    for i, j in zip(weighted, weighted[1:], strict=False):
        (pname, producer), (cname, consumer) = leaves[i], leaves[j]
        norms = [n for n, m in leaves[i + 1 : j] if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
        if len(norms) > 1:
            raise ValueError(f"more than one norm between '{pname}' and '{cname}': {norms}")
        units = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
        inputs = consumer.in_channels if isinstance(consumer, nn.Conv2d) else consumer.in_features
        if inputs % units:
            raise ValueError(f"'{cname}' reads {inputs} inputs, not a multiple of the {units} units of '{pname}'")
        groups.append(ChannelGroup(pname, norms[0] if norms else None, cname, inputs // units))
    return groups
