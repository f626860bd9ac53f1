"""Width granularity (DS-Net style): per input, a gate picks one prefix width for every channel-gatable
layer inside a block (a ResNet block's inner conv, a MobileNetV2 block's expansion and depthwise convs).

The choice among widths w_1 < ... < w_K = 1 is made by K-1 nested binary units ("wider than w_k?"),
so every binary gate family (sigmoid, gumbel, l1, policy, ...) decides widths unchanged; the channels
kept are always the first ceil(w * C) of each layer: a contiguous slice a runtime can execute without a
gather. The FLOPs of a choice follow from the channel formula with those prefix masks. The FLOPs report
gets a histogram of the chosen widths; compiled, the block decides once (:class:`WidthBlock`) and its
layers run weight prefixes. Its training term ``width_targets`` is DS-Net's gate-target loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynprune.gates import Gate
from dynprune.granularity.base import (
    FlopsTerms,
    ModuleGranularity,
    Site,
    TermBatch,
    add_gate,
    layers_inside,
    register_granularity,
)
from dynprune.granularity.channel import ChannelGranularity
from dynprune.hooks import DecideHook, HookSwitch, MaskHook, PrefixMask
from dynprune.runtime.executor import Executor
from dynprune.runtime.widths import WidthBlock, WidthSlot
from dynprune.trace import LayerInfo, Trace

DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)


def chosen_widths(units: Tensor, widths: Sequence[float]) -> Tensor:
    """The width each input runs at, (N,), from nested decisions (N, K-1)."""
    index = (units >= 0.5).long().cumprod(dim=1).sum(dim=1)
    return units.new_tensor(list(widths))[index]


@dataclass
class WidthSite(Site):
    """A width-gated block; ``widths`` it chooses among; ``expanders``: {layer: decisions -> (N, C) prefix mask}."""

    widths: list[float] = field(default_factory=lambda: list(DEFAULT_WIDTHS))
    expanders: dict[str, PrefixMask] = field(default_factory=dict)


class WidthExecutor(Executor):
    """The block decides its width once; each narrowed layer runs a weight prefix (a ThinLayer with a WidthSlot)."""

    def narrowed(self, site: Site) -> dict[str, Any]:
        return {layer: WidthSlot(expand) for layer, expand in site.expanders.items()}

    def wrap(self, module: nn.Module, site: Site, gate: Gate, inner: list[Gate],
             slots: dict[str, Any]) -> nn.Module:
        return WidthBlock(module, gate, list(slots.values()))


@register_granularity("width")
class WidthGranularity(ModuleGranularity):
    """Gates one width per input for the channel-gatable layers inside each block (default: every block
    with a residual addition inside, stage-changing ones included).

    Args:
        widths: the widths to choose among, increasing from > 0 to 1.0 (at least two).
        layout: how the gate reads the block's input (default: from its rank).
    """

    name = "width"
    executor = WidthExecutor()
    report_title = "width chosen"
    term_weights = ("width_targets",)

    def __init__(self, widths: Sequence[float] = DEFAULT_WIDTHS, layout: str | None = None) -> None:
        super().__init__(layout)
        widths = [float(w) for w in widths]
        if sorted(widths) != widths or widths[-1] != 1.0 or widths[0] <= 0 or len(widths) < 2:
            raise ValueError(f"widths must increase from > 0 to 1.0 and have >= 2 entries, got {widths}")
        self.widths = widths

    def _inner(self, trace: Trace, name: str) -> list[str]:
        channel = ChannelGranularity()
        return [n for n in layers_inside(trace, name) if channel.ineligible(trace, n) is None]

    def ineligible(self, trace: Trace, name: str) -> str | None:
        if problem := self.module_problem(trace, name):
            return problem
        if not self._inner(trace, name):
            return "it holds no conv/linear layer whose output channels can be narrowed (all feed residual additions)"
        return None

    def default(self, trace: Trace, skip_first: bool, skip_last: bool) -> list[str]:
        return [n for n, i in trace.modules.items() if n and i.merges == 1 and i.calls == 1]

    def attach(self, model: nn.Module, trace: Trace, name: str, gate: str, gate_kwargs: dict[str, float],
               switch: HookSwitch) -> Site:
        layers = self._inner(trace, name)
        info = trace.modules[name]
        layout = self.input_layout(trace, name)
        expanders = {layer: PrefixMask(self.widths, trace.layers[layer].out_channels) for layer in layers}
        units = len(self.widths) - 1
        net, path = add_gate(model, name, gate, layout.features(info.in_shape), units, gate_kwargs, layout)
        model.get_submodule(name).register_forward_pre_hook(DecideHook(switch, net))
        for layer in layers:
            linfo = trace.layers[layer]
            target = model.get_submodule(linfo.norm or layer)
            target.register_forward_hook(MaskHook(switch, net, linfo.channel_dim, expanders[layer]))
        return WidthSite(name, self, units, tuple(layers), layout, gate_path=path, widths=list(self.widths),
                         expanders=expanders)

    def flops_terms(self, site: Site, mask: Tensor) -> FlopsTerms:
        return FlopsTerms(masks={layer: expand(mask) for layer, expand in site.expanders.items()})

    def effective(self, site: Site, decisions: Tensor) -> Tensor:
        """Unit k counts only when units 1..k are on (nested widths)."""
        return decisions.cumprod(dim=1)

    def skips_when_closed(self, site: Site, layers: dict[str, LayerInfo]) -> bool:
        """Every unit off runs the narrowest width: never a dead layer."""
        return True

    def report(self, site: Site, decisions: Tensor) -> dict[str, float]:
        """{width: share of inputs that ran at it}."""
        chosen = chosen_widths(decisions.float(), site.widths)
        return {str(w): float((chosen == w).float().mean()) for w in site.widths}

    def training_terms(self, batch: TermBatch) -> dict[str, Tensor]:
        """``width_targets`` (weight) x DS-Net's gate-target loss (see :func:`width_target_loss`)."""
        weight = batch.settings["width_targets"]
        return {"width_targets": weight * width_target_loss(batch)[0]} if weight > 0 else {}


def width_target_loss(batch: TermBatch) -> tuple[Tensor, Tensor]:
    """DS-Net's gate targets: (BCE of the width units' probabilities against the targets, targets (N,)), the target
    0 (smallest width) where the network at its smallest widths classifies the input right, else 1 (largest). Reads
    the gates' probabilities of the training forward pass; the all-smallest pass is a side pass."""
    probs = {n: g.probs for n, g in batch.gates.items()}
    with torch.no_grad(), batch.side_pass():
        for name, gate in batch.gates.items():
            gate.force(torch.zeros(batch.sites[name].units, device=batch.x.device))
        small_right = batch.model(batch.x).argmax(dim=1) == batch.y
    target = (~small_right).to(batch.x.dtype)
    bce = [F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), target[:, None].expand_as(p)) for p in probs.values()]
    return torch.stack(bce).mean(), target
