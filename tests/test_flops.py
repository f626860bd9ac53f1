"""FLOPs: dense counts match FlopCounterMode; masks reduce per-layer FLOPs as the contract says."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp


@pytest.mark.parametrize("name", ["resnet20", "vgg11", "mobilenetv2", "lenet5"])
def test_all_gates_on_equals_flopcounter_of_ungated_backbone(name: str) -> None:
    dense = dp.backbones.create(name, width_mult=0.5)
    with FlopCounterMode(display=False) as counter:
        dense.eval()(torch.zeros(1, 1, 28, 28))
    model = dp.gate_model(dp.backbones.create(name, width_mult=0.5), gate="sigmoid")
    profile = dp.gating_info(model).flops
    ones = {n: torch.ones(3, site.units) for n, site in dp.gating_info(model).sites.items()}
    assert profile.dense_total == counter.get_total_flops()
    assert torch.equal(profile.effective(ones), torch.full((3,), float(counter.get_total_flops()), dtype=torch.float32))
    # gate FLOPs are reported separately and are what FlopCounterMode sees on top of the backbone
    with FlopCounterMode(display=False) as gated_counter:
        model.eval()(torch.zeros(1, 1, 28, 28))
    assert profile.gate_flops > 0
    assert gated_counter.get_total_flops() == profile.dense_total + profile.gate_flops


def test_half_channels_off_in_a_chain() -> None:
    chain = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 3),
    )
    model = dp.gate_model(chain, gate="sigmoid", input_shape=(1, 6, 6))
    info = dp.gating_info(model)
    assert info.gated == ["2", "4", "6"]
    half = torch.tensor([[1.0] * 4 + [0.0] * 4])
    masks = {"2": half, "4": half, "6": torch.tensor([[1.0, 1.0, 0.0, 0.0]])}
    per_layer = info.flops.per_layer(masks)
    dense = {layer.name: layer.dense for layer in info.flops.layers}
    assert dense["2"] == 2 * 8 * 8 * 9 * 36  # FLOPs = 2 x MACs
    assert per_layer["0"].item() == dense["0"]            # first conv: not gated, no gated input
    assert per_layer["2"].item() == dense["2"] * 0.5      # output half
    assert per_layer["4"].item() == dense["4"] * 0.25     # input half x output half
    assert per_layer["6"].item() == dense["6"] * 0.25     # input half x output half
    assert per_layer["8"].item() == dense["8"] * 0.5      # linear after flatten: input half
    total = sum(per_layer.values()).item() + info.flops.other
    assert info.flops.effective(masks).item() == pytest.approx(total)


def test_depthwise_uses_per_channel_product() -> None:
    model = dp.gate_model(dp.backbones.create("mobilenetv2", width_mult=0.5), gate="sigmoid")
    info = dp.gating_info(model)
    dw = next(lay for lay in info.flops.layers
              if lay.depthwise and lay.producer in info.sites and lay.name in info.sites)
    c = info.sites[dw.name].units
    a = torch.zeros(1, c)
    a[:, : c // 2] = 1
    b = torch.zeros(1, c)
    b[:, c // 2:] = 1  # disjoint halves: no channel is both read and written
    masks = {n: torch.ones(1, site.units) for n, site in info.sites.items()}
    masks[dw.producer], masks[dw.name] = a, b
    assert info.flops.per_layer(masks)[dw.name].item() == 0.0


def test_count_flops_per_module() -> None:
    total, per_module = dp.count_flops(nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 2)), (10,))
    assert per_module["0"] == 2 * 10 * 4 and per_module["1"] == 2 * 4 * 2 and total == 96


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad, torch.enable_grad])
def test_flop_counter_counts_the_runtimes_sparse_product(mode: type) -> None:
    """An embedding bag with per-sample weights is the runtime's sparse matrix-vector product: 2 x D FLOPs per
    gathered row, counted in every autograd mode (FlopCounterMode alone counts 0)."""
    from dynprune.flops import flop_counter

    table, rows, weights = torch.randn(10, 4), torch.tensor([[1, 3, 5]]), torch.randn(1, 3)
    with mode(), flop_counter() as counter:
        out = torch.nn.functional.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")
    assert counter.get_total_flops() == 2 * 3 * 4
    torch.testing.assert_close(out, weights @ table[rows[0]])
    with FlopCounterMode(display=False) as plain:
        torch.nn.functional.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")
    assert plain.get_total_flops() == 0
