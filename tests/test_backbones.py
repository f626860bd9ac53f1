"""Every registered backbone x every gate: shapes, gradients into the gates, mask ranges."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp
from dynprune.gates import GateContext, Rollout


def random_context(n: int, name: str) -> GateContext:
    """A GateContext with random per-input losses and costs, for families with their own term."""
    greedy = Rollout(torch.rand(n), {name: torch.rand(n)}, torch.rand(n))
    return GateContext(torch.rand(n), torch.rand(n), lambda: greedy, 0.5, name, lambda c=None: torch.tensor(1.0))

SMALL = {"vgg11": 0.25, "vgg16": 0.25, "mobilenetv2": 0.5}


def _make(name: str, gate: str):
    net = dp.backbones.create(name, num_classes=7, in_chans=1, input_size=28, width_mult=SMALL.get(name, 1.0))
    return dp.gate_model(net, gate=gate)


@pytest.mark.parametrize("gate", dp.list_gates())
@pytest.mark.parametrize("name", dp.list_backbones())
def test_backbone_gate_forward_backward(name: str, gate: str) -> None:
    model = _make(name, gate).train()
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    assert out.shape == (3, 7)
    masks = dp.collect_masks(model)
    assert masks and all(m.shape[0] == 3 for m in masks.values())
    assert all(((m >= 0) & (m <= 1)).all() for m in masks.values())
    loss = out.square().mean() + sum(m.mean() for m in masks.values())
    family = [g.training_loss(random_context(3, name)) for name, g in dp.gates_of(model).items()]
    loss = loss + sum(t for t in family if t is not None)  # e.g. REINFORCE: the policy's own surrogate
    loss.backward()
    grads = [g.fc2.weight.grad for g in dp.gates_of(model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        model(x)
    for mask in dp.collect_masks(model).values():
        assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet21'.*resnet20"):
        dp.backbones.create("resnet21")


@pytest.mark.parametrize("width", [0.5, 2.0])
def test_width_mult_scales_channels(width: float) -> None:
    net = dp.backbones.create("resnet20", width_mult=width)
    assert net.fc.in_features == int(64 * width)


def test_depth_mult_scales_blocks() -> None:
    assert len(dp.backbones.create("resnet20", depth_mult=2.0).layer1) == 6
    assert len(dp.backbones.create("resnet56").layer1) == 9


def test_unsupported_arguments_are_errors_naming_the_backbones_that_take_them() -> None:
    with pytest.raises(ValueError, match="backbone 'vgg11' does not support depth_mult=2; backbones that do: "
                                         "mobilenetv2, resnet20, resnet56"):
        dp.backbones.create("vgg11", depth_mult=2)
    with pytest.raises(ValueError, match="backbone 'lenet5' does not support shortcut='B'; backbones that do: "
                                         "resnet20, resnet56"):
        dp.backbones.create("lenet5", shortcut="B")
    with pytest.raises(ValueError, match="'resnet20' does not support widht_mult=0.5; backbones that do: none"):
        dp.backbones.create("resnet20", widht_mult=0.5)
    assert dp.backbones.create("vgg11", depth_mult=1.0).classifier.in_features == 512  # the default is a no-op


@pytest.mark.parametrize("name", dp.list_backbones())
def test_flops_profile_equals_flopcounter_of_the_ungated_backbone(name: str) -> None:
    dense = dp.backbones.create(name, width_mult=SMALL.get(name, 1.0))
    with FlopCounterMode(display=False) as counter:
        dense.eval()(torch.zeros(1, 1, 28, 28))
    model = dp.gate_model(dp.backbones.create(name, width_mult=SMALL.get(name, 1.0)), gate="sigmoid")
    model.eval()(torch.zeros(2, 1, 28, 28))
    profile = dp.gating_info(model).flops
    ones = {n: torch.ones_like(m) for n, m in dp.collect_masks(model).items()}
    assert profile.dense_total == counter.get_total_flops() > 0
    assert torch.equal(profile.ratio(ones), torch.ones(2))  # every gate on: dense FLOPs exactly


def test_subpackages_are_reachable_from_the_top_level() -> None:
    assert callable(dp.static.prune_model) and callable(dp.compression.deep_compression)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dp.nothing  # noqa: B018


def test_lenet5_names_the_smallest_input_it_accepts() -> None:
    """The message's bound is the real one: the smallest size named is accepted, one less is refused."""
    for name, smallest in (("lenet5", 12), ("lenet5_caffe", 16)):
        dp.backbones.create(name, input_size=smallest)
        message = f"lenet5 needs input_size >= {smallest}, got {smallest - 1}"
        with pytest.raises(ValueError, match=message):
            dp.backbones.create(name, input_size=smallest - 1)
