"""Slimmable supernets: each width equals an independently built thin model, switchable BN,
calibration of an unseen width, the sandwich step, and training through Lightning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rounding, quiet_trainer_kwargs, weight_depth
from torch import nn

import dynprune as dp
from dynprune.flops import count_flops
from dynprune.slimmable import (
    SlimmableClassifier,
    SwitchableBatchNorm2d,
    ThinBackbone,
    calibrate_bn,
    export_thin,
    make_slimmable,
    set_width,
    spec_of,
)
from dynprune.slimmable.module import distill_loss

WIDTHS = [0.25, 0.5, 0.75, 1.0]
SHAPE = (1, 28, 28)
# mobilenetv2's thin models round channels to multiples of 8 and keep the last conv at 320: its
# supernet takes their channel counts from the reference; resnet20 and vgg11 use the ceil rule.
REFERENCES = {"resnet20": None, "vgg11": None, "mobilenetv2": ThinBackbone("mobilenetv2")}


def supernet(name: str, widths: list[float] = WIDTHS) -> nn.Module:
    return make_slimmable(dp.backbones.create(name), widths, REFERENCES[name])


def switchable(model: nn.Module) -> list[SwitchableBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]


@torch.no_grad()
def randomize_norms(model: nn.Module) -> None:
    """Give every width's BNs their own statistics (a train-mode pass) and random affine parameters."""
    model.train()
    for w in spec_of(model).widths:
        set_width(model, w)
        model(torch.randn(8, *SHAPE))
    for switch in switchable(model):
        for bn in switch.bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
    model.eval()


@pytest.mark.numerics
@pytest.mark.parametrize("name", list(REFERENCES))
def test_every_width_is_the_thin_model(name: str) -> None:
    net = supernet(name)
    randomize_norms(net)
    x = torch.randn(4, *SHAPE)
    flops = []
    for w in WIDTHS:
        thin = dp.backbones.create(name, width_mult=w).eval()
        thin.load_state_dict(export_thin(net, w))  # strict: every shape must match the thin model's
        set_width(net, w)
        flops.append(count_flops(net, SHAPE)[0])
        assert flops[-1] == count_flops(thin, SHAPE)[0]
        with torch.no_grad():
            assert_close_rounding(net(x), thin(x), depth=weight_depth(thin))
    assert flops == sorted(flops) and flops[0] < 0.2 * flops[-1]


def test_ceil_rule_mobilenet_is_valid() -> None:
    """Without a reference every group uses ceil(w*C) channels; depthwise convs follow their input."""
    net = make_slimmable(dp.backbones.create("mobilenetv2"), WIDTHS).eval()
    spec = spec_of(net)
    assert len(spec.follows) == 8 and spec.fixed == {"classifier"}
    flops = []
    for w in WIDTHS:
        set_width(net, w)
        assert net(torch.randn(2, *SHAPE)).shape == (2, 10)
        flops.append(count_flops(net, SHAPE)[0])
    set_width(net, 0.25)
    net(torch.randn(2, *SHAPE))
    assert net.get_submodule("features.2.block.3").in_active == 24  # ceil(0.25 * 96) from its producer
    assert spec.table[0.25]["features.2.block.3"] == spec.table[0.25]["features.2.block.0"] == 24
    assert flops == sorted(flops) and len(set(flops)) == 4


def test_resnet_groups_follow_residual_additions() -> None:
    spec = spec_of(supernet("resnet20"))
    assert spec.groups["conv1"] == ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert spec.groups["layer3.0.conv2"] == ["layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2"]
    assert spec.groups["layer2.1.conv1"] == ["layer2.1.conv1"]
    assert spec.fixed == {"fc"}


def test_switchable_bn_keeps_statistics_per_width() -> None:
    net = supernet("resnet20").train()
    bn = net.get_submodule("layer2.0.bn1")
    assert [b.num_features for b in bn.bns] == [8, 16, 24, 32]
    before = [b.running_mean.clone() for b in bn.bns]
    set_width(net, 0.5)
    with torch.no_grad():
        net(torch.randn(8, *SHAPE))
    changed = [not torch.equal(b.running_mean, m) for b, m in zip(bn.bns, before, strict=True)]
    assert changed == [False, True, False, False]


def test_unknown_width_is_an_error() -> None:
    net = supernet("resnet20")
    with pytest.raises(ValueError, match=r"width 0.375 has no BatchNorm statistics; choose one of \[0.25"):
        set_width(net, 0.375)
    with pytest.raises(ValueError, match="widths must be"):
        make_slimmable(dp.backbones.create("resnet20"), [0.5, 1.5])


@pytest.mark.numerics
def test_calibration_sets_the_statistics_of_an_unseen_width() -> None:
    net = supernet("resnet20")
    x = torch.randn(16, *SHAPE) + 0.5
    stem = net.get_submodule("bn1")
    old = [b.running_mean.clone() for b in stem.bns]
    calibrate_bn(net, 0.375, [(x, torch.zeros(16))], batches=1)
    assert spec_of(net).widths[-1] == 0.375 and spec_of(net).width == 1.0  # width restored
    new = stem.bns[-1]
    assert new.num_features == 6  # ceil(0.375 * 16)
    with torch.no_grad():
        conv_out = F.conv2d(x, net.conv1.weight[:6], padding=1)
    assert_close_rounding(new.running_mean, conv_out.mean(dim=(0, 2, 3)), depth=2, scale=conv_out.abs().max().item())
    assert all(torch.equal(b.running_mean, m) for b, m in zip(stem.bns[:-1], old, strict=True))
    set_width(net, 0.375)
    assert net.eval()(x).shape == (16, 10)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("name", list(REFERENCES))
def test_sandwich_step_reaches_largest_and_smallest(name: str) -> None:
    module = SlimmableClassifier(name, widths=WIDTHS, num_random=0)
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    module.training_step((x, y), 0).backward()
    spec = spec_of(module.model)
    slimmed = [n for n, m in module.model.named_modules()
               if isinstance(m, nn.Conv2d) and m.groups == 1 and spec.table[0.75][n] < spec.full[n]]
    conv = module.model.get_submodule(slimmed[-1])
    assert conv.weight.grad[-1].abs().sum() > 0  # the last output channel runs at width 1 only
    bns = switchable(module.model)
    assert all(b.bns[0].weight.grad.abs().sum() > 0 for b in bns)  # smallest width's BNs
    assert all(b.bns[3].weight.grad.abs().sum() > 0 for b in bns)  # largest width's BNs
    assert all(b.bns[1].weight.grad is None and b.bns[2].weight.grad is None for b in bns)


def test_sandwich_widths_and_distillation() -> None:
    module = SlimmableClassifier("resnet20", widths=WIDTHS, num_random=3)
    widths = module.step_widths()
    assert widths[:2] == [1.0, 0.25] and len(widths) == 5 and set(widths[2:]) <= {0.5, 0.75}
    assert SlimmableClassifier("resnet20", rule="all").step_widths() == [1.0, 0.75, 0.5, 0.25]
    teacher = torch.randn(5, 10)
    assert distill_loss(teacher, teacher, 2.0).item() == 0.0  # the same bits on both sides
    assert distill_loss(torch.zeros(5, 10), teacher, 1.0) > 0.1
    with pytest.raises(ValueError, match="unknown rule 'both'; choose one of: sandwich, all"):
        SlimmableClassifier("resnet20", rule="both")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_mean_reduction_divides_the_sum_by_the_number_of_widths() -> None:
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    losses = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(0)
        module = SlimmableClassifier("resnet20", rule="all", reduction=reduction).train()
        losses[reduction] = module.training_step((x, y), 0).item()
    assert losses["sum"] > 2.0 and losses["mean"] == pytest.approx(losses["sum"] / 4, rel=1e-5)


def test_unslimmable_norm_is_an_error_before_any_change() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with pytest.raises(ValueError, match=r"BatchNorm layer\(s\) \['2'\] do not follow a conv/linear directly"):
        make_slimmable(net, input_shape=SHAPE)
    assert type(net[0]) is nn.Conv2d and not hasattr(net, "slimmable")


def test_fit_trains_in_train_mode_and_reports_every_width() -> None:
    L.seed_everything(0)
    module = SlimmableClassifier("resnet20", widths=[0.25, 1.0], input_size=8, lr=0.05)
    module.model.eval()  # issue #15: fit must still train BN statistics
    bn = module.model.get_submodule("bn1").bns[0]
    trainer = L.Trainer(**quiet_trainer_kwargs(max_epochs=1, limit_train_batches=3, limit_val_batches=2))
    trainer.fit(module, datamodule=dp.DigitsDataModule(batch_size=32))
    assert int(bn.num_batches_tracked) == 3 and bn.running_mean.abs().sum() > 0
    metrics = trainer.callback_metrics
    assert {"val/acc_w0.25", "val/acc_w1", "val/acc", "val/flops_w0.25", "val/flops_w1"} <= set(metrics)
    assert metrics["val/flops_w0.25"] == module.flops[0.25] < 0.2 * float(metrics["val/flops_w1"])
    assert metrics["val/acc"] == metrics["val/acc_w1"]
