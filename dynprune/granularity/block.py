"""Block granularity: a gate per residual block or branch decides, per input, whether it runs.

From the trace: a module whose output only feeds a residual addition is a *residual branch* (skipped:
contributes zeros); a module that contains the addition and keeps its input's shape is a *whole block*
(skipped: passes its input through). Default: every whole block with exactly one addition inside.
"""

from __future__ import annotations

from torch import Tensor, nn

from dynprune.granularity.base import ModuleGranularity, Site, add_gate, layers_inside, register_granularity
from dynprune.hooks import DecideHook, HookSwitch, SkipHook
from dynprune.trace import Trace


@register_granularity("block")
class BlockGranularity(ModuleGranularity):
    """Gates (N, 1) run/skip decisions of residual branches and whole residual blocks."""

    name = "block"

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
        module = model.get_submodule(name)
        net, path = add_gate(model, name, gate, info.in_shape[0], 1, gate_kwargs)
        module.register_forward_pre_hook(DecideHook(switch, net))
        module.register_forward_hook(SkipHook(switch, net, whole=not info.branch))
        return Site(name, self.name, 1, "branch" if info.branch else "whole", layers_inside(trace, name),
                    gate_path=path)

    def flops_terms(self, site: Site, mask: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        return {}, mask[:, 0]
