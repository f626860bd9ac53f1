"""FLOPs: dense per-layer counts from ``torch.utils.flop_counter.FlopCounterMode`` and per-input
effective FLOPs of a gated model.

All numbers are FLOPs = 2 x MACs (FlopCounterMode's convention) for one input (batch 1).
A layer's effective FLOPs for input i are ``dense_l * keep_in_l(i) * keep_out_l(i)``: keep_out is
its own gate's kept fraction, keep_in the kept fraction of the gated layer feeding it (a
depthwise conv uses the per-channel product of both masks). Ops outside conv/linear layers
(e.g. a functional matmul) are counted densely; the gates' own FLOPs are reported separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dynprune.trace import LayerInfo


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """Dense FLOPs of ``model`` on one input of shape (C, H, W): (total, {module path: flops}).

    Per-module counts include their children, as FlopCounterMode reports them.
    """
    example = torch.zeros(1, *input_shape, device=_device(model))
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    per_module = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        path = key.split(".", 1)[1] if "." in key else ""
        per_module[path] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass
class LayerFlops:
    """One conv/linear layer's dense FLOPs and where its keep fractions come from."""

    name: str
    dense: int
    gated: bool
    producer: str | None
    depthwise: bool


@dataclass
class FlopsProfile:
    """Dense FLOPs of a backbone and the recipe for its per-input effective FLOPs."""

    input_shape: tuple[int, ...]
    dense_total: int
    layers: list[LayerFlops]
    gate_flops: int = 0
    other: int = field(init=False)

    def __post_init__(self) -> None:
        self.other = self.dense_total - sum(layer.dense for layer in self.layers)

    @classmethod
    def build(
        cls, model: nn.Module, input_shape: tuple[int, ...], infos: dict[str, LayerInfo],
        gated: set[str],
    ) -> FlopsProfile:
        """Count ``model`` (not yet gated) densely and link each layer to the gate feeding it."""
        total, per_module = count_flops(model, input_shape)
        layers = []
        for info in infos.values():
            producer = info.producer if info.producer in gated else None
            layers.append(LayerFlops(info.name, per_module.get(info.name, 0), info.name in gated,
                                     producer, info.depthwise))
        return cls(tuple(input_shape), total, layers)

    def per_layer(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Effective FLOPs per layer and input, {name: (N,)}; differentiable through the masks."""
        batch = next(iter(masks.values())).shape[0]
        device = next(iter(masks.values())).device
        out = {}
        for layer in self.layers:
            keep_out = masks[layer.name] if layer.gated else None
            keep_in = masks[layer.producer] if layer.producer else None
            if layer.depthwise and keep_in is not None and keep_out is not None:
                keep = (keep_in * keep_out).mean(dim=1)
            else:
                keep = torch.ones(batch, device=device)
                for m in (keep_in, keep_out):
                    if m is not None:
                        keep = keep * m.mean(dim=1)
            out[layer.name] = layer.dense * keep
        return out

    def total(self, per_layer: dict[str, Tensor]) -> Tensor:
        """Backbone FLOPs per input (N,) from :meth:`per_layer`'s result (plus the ungated rest)."""
        return sum(per_layer.values()) + self.other

    def effective(self, masks: dict[str, Tensor]) -> Tensor:
        """Effective backbone FLOPs per input (N,), excluding the gates' own FLOPs."""
        return self.total(self.per_layer(masks))

    def ratio(self, masks: dict[str, Tensor]) -> Tensor:
        """Effective backbone FLOPs / dense backbone FLOPs, per input (N,)."""
        return self.effective(masks) / self.dense_total
