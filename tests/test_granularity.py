"""The granularity seam: block gating on every residual backbone x every gate family, FLOPs accounting
against FlopCounterMode, and the cost term lowering the block execution rate."""

from __future__ import annotations

import pytest
import torch
from conftest import digits_masks_after_fit

import dynprune as dp
from dynprune.gates import GateContext, Rollout

RESIDUAL = [name for name in dp.list_backbones() if name.startswith(("resnet", "mobilenet"))]


def test_registry_lists_the_granularities() -> None:
    assert {"block", "channel"} <= set(dp.list_granularities())


@pytest.mark.parametrize("gate", dp.list_gates())
@pytest.mark.parametrize("name", RESIDUAL)
def test_block_gates_on_residual_backbones(name: str, gate: str) -> None:
    dense = dp.backbones.create(name, width_mult=0.5)
    total, per_module = dp.count_flops(dense, (1, 28, 28))
    model = dp.gate_model(dp.backbones.create(name, width_mult=0.5), gate, granularity="block", init_bias=0.0)
    info = dp.gating_info(model)
    assert info.sites and all(s.units == 1 and s.kind == "whole" for s in info.sites.values())
    x = torch.randn(4, 1, 28, 28)
    out = model.train()(x)
    extra = [g.training_loss(GateContext(torch.rand(4), torch.rand(4),
                                         lambda n=n: Rollout(torch.rand(4), {n: torch.rand(4)}, torch.rand(4)), 0.5, n,
                                         lambda c=None: torch.tensor(1.0)))
             for n, g in dp.gates_of(model).items()]
    loss = out.square().mean() + sum(m.sum() for m in dp.collect_masks(model).values())
    (loss + sum(t for t in extra if t is not None)).backward()
    assert all(g.fc2.weight.grad is not None and g.fc2.weight.grad.abs().sum() > 0
               for g in dp.gates_of(model).values())
    ones = {n: torch.ones(1, 1) for n in info.sites}
    assert info.flops.effective(ones).item() == total
    for block in info.sites:
        off = dict(ones, **{block: torch.zeros(1, 1)})
        assert info.flops.effective(off).item() == total - per_module[block]


def _exec_rate(lam: float) -> float:
    rates = [torch.cat(list(masks.values())).mean() for masks in digits_masks_after_fit("block", lam)]
    return torch.stack(rates).mean().item()


def test_lambda_lowers_the_block_execution_rate_on_digits() -> None:
    assert _exec_rate(2.0) < _exec_rate(0.0) - 0.2
