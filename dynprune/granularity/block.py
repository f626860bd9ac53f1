"""Block granularity: a gate per residual block or branch decides, per input, whether it runs.

From the trace: a module whose output only feeds a residual addition is a *residual branch* (skipped:
contributes zeros); a module that contains the addition and keeps its input's shape is a *whole block*
(skipped: passes its input through). Default: every whole block with exactly one addition inside.
Compiled, a gated block runs only on the sub-batch of inputs that execute it (:class:`SubBatchBlock`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from dynprune.gates import Gate
from dynprune.granularity.base import (
    FlopsTerms,
    ModuleGranularity,
    Site,
    add_gate,
    layers_inside,
    register_granularity,
)
from dynprune.hooks import DecideHook, HookSwitch, SkipHook
from dynprune.runtime.blocks import SubBatchBlock
from dynprune.runtime.executor import Executor
from dynprune.trace import LayerInfo, Trace


@dataclass
class BlockSite(Site):
    """A gated block; ``kind``: ``branch`` (skipped: adds zeros) or ``whole`` (skipped: passes its input through)."""

    kind: str = "whole"


class BlockExecutor(Executor):
    """The block (kept out of BatchNorm folding) runs on the sub-batch that executes it."""

    def keep(self, site: Site) -> set[str]:
        return {site.name}

    def wrap(self, module: nn.Module, site: Site, gate: Gate, inner: list[Gate],
             slots: dict[str, Any]) -> nn.Module:
        return SubBatchBlock(module, gate, site.kind == "whole", inner)


@register_granularity("block")
class BlockGranularity(ModuleGranularity):
    """Gates (N, 1) run/skip decisions of residual branches and whole residual blocks."""

    name = "block"
    executor = BlockExecutor()

    def ineligible(self, trace: Trace, name: str) -> str | None:
        if problem := self.module_problem(trace, name):
            return problem
        info = trace.modules[name]
        if info.branch or info.whole_block:
            return None
        if info.merges >= 1:
            return (f"it changes the shape from {info.in_shape} to {info.out_shape} (a stage-changing block): "
                    "a skipped block could not pass its input through")
        return ("its output does not feed a residual addition only, and it contains none: skipping it would "
                "cut the network")

    def default(self, trace: Trace, skip_first: bool, skip_last: bool) -> list[str]:
        return [n for n, i in trace.modules.items() if n and i.whole_block and i.merges == 1]

    def attach(self, model: nn.Module, trace: Trace, name: str, gate: str, gate_kwargs: dict[str, float],
               switch: HookSwitch) -> Site:
        info = trace.modules[name]
        layout = self.input_layout(trace, name)
        module = model.get_submodule(name)
        net, path = add_gate(model, name, gate, layout.features(info.in_shape), 1, gate_kwargs, layout)
        module.register_forward_pre_hook(DecideHook(switch, net))
        module.register_forward_hook(SkipHook(switch, net, whole=not info.branch))
        return BlockSite(name, self, 1, layers_inside(trace, name), layout, gate_path=path,
                         kind="branch" if info.branch else "whole")

    def flops_terms(self, site: Site, mask: Tensor) -> FlopsTerms:
        return FlopsTerms(scale=dict.fromkeys(site.layers, mask[:, 0]))

    def skips_when_closed(self, site: Site, layers: dict[str, LayerInfo]) -> bool:
        return True
