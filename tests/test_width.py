"""Width granularity: nested decisions choose a prefix width; FLOPs and outputs equal those of the thin
model of the chosen widths; the cost term moves the chosen widths down."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import assert_close_rounding, digits_masks_after_fit, quiet_trainer_kwargs, weight_depth
from torch import nn

import dynprune as dp
from dynprune.granularity import report_sections
from dynprune.granularity.width import chosen_widths, width_target_loss
from dynprune.hooks import PrefixMask


def test_prefix_masks_and_chosen_widths() -> None:
    expand = PrefixMask([0.25, 0.5, 0.75, 1.0], 8)
    units = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert expand(units).tolist() == [[1.0] * 8, [1.0] * 4 + [0.0] * 4, [1.0] * 2 + [0.0] * 6]
    assert chosen_widths(units, [0.25, 0.5, 0.75, 1.0]).tolist() == [1.0, 0.5, 0.25]


def _thin(dense: nn.Module, block: str, keep: int) -> nn.Module:
    """A copy of a ResNet whose ``block`` keeps only the first ``keep`` channels of its inner conv."""
    thin = copy.deepcopy(dense)
    b = thin.get_submodule(block)
    conv1, bn1, conv2 = b.conv1, b.bn1, b.conv2
    b.conv1 = nn.Conv2d(conv1.in_channels, keep, 3, conv1.stride, 1, bias=False)
    b.conv1.weight.data = conv1.weight.data[:keep].clone()
    b.bn1 = nn.BatchNorm2d(keep)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(b.bn1, name).data = getattr(bn1, name).data[:keep].clone()
    b.conv2 = nn.Conv2d(keep, conv2.out_channels, 3, 1, 1, bias=False)
    b.conv2.weight.data = conv2.weight.data[:, :keep].clone()
    return thin.eval()


@pytest.mark.numerics
def test_flops_and_outputs_equal_the_thin_model_of_the_chosen_widths() -> None:
    torch.manual_seed(0)
    dense = dp.backbones.create("resnet20", width_mult=0.5).eval()
    for m in dense.modules():  # non-trivial BN statistics, so a wrong slice would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    gated = dp.gate_model(copy.deepcopy(dense), "sigmoid", granularity="width").eval()
    info = dp.gating_info(gated)
    assert info.sites["layer2.1"].layers == ("layer2.1.conv1",) and info.sites["layer2.1"].units == 3
    for gate in dp.gates_of(gated).values():
        gate.force(torch.ones(3))
    dp.gates_of(gated)["layer2.1"].force(torch.tensor([1.0, 0.0, 1.0]))  # width 0.5 (a later 1 is ignored)
    x = torch.randn(2, 1, 28, 28)
    out = gated(x)
    thin = _thin(dense, "layer2.1", 8)  # ceil(0.5 * 16)
    assert_close_rounding(out, thin(x), depth=weight_depth(thin))
    assert info.flops.effective(dp.collect_masks(gated))[0].item() == dp.count_flops(thin, (1, 28, 28))[0]


def _mean_width(lam: float) -> float:
    widths = [chosen_widths(m, [0.25, 0.5, 0.75, 1.0]) for masks in digits_masks_after_fit("width", lam)
              for m in masks.values()]
    return torch.cat(widths).mean().item()


def test_lambda_moves_the_chosen_widths_down_on_digits() -> None:
    assert _mean_width(2.0) < _mean_width(0.0) - 0.15


def test_flops_report_has_a_histogram_of_chosen_widths() -> None:
    module = dp.GatedClassifier("resnet20", gate="sigmoid", granularity="width", input_size=8, width_mult=0.5)
    masks = {"layer1.1": torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 1], [1, 0, 1]], dtype=torch.bool)}
    shares = report_sections(dp.gating_info(module.model).sites, masks)["width chosen"]["layer1.1"]
    assert shares == {"0.25": 0.25, "0.5": 0.5, "0.75": 0.0, "1.0": 0.25}


def test_dsnet_gate_targets_follow_the_smallest_subnet_and_leave_no_trace() -> None:
    """Target 0 (smallest width) exactly where the all-smallest network classifies right, else 1; the side pass
    changes neither BatchNorm statistics nor the gates' last decisions; the term trains the gates."""
    L.seed_everything(0)
    module = dp.GatedClassifier("resnet20", gate="sigmoid", granularity="width", input_size=8, width_mult=0.5,
                                width_targets=1.0).train()
    x = torch.randn(16, 1, 8, 8)
    smallest = copy.deepcopy(module.model)
    for g in dp.gates_of(smallest).values():
        g.force(torch.zeros(g.fc2.out_features))
    with torch.no_grad():
        pred = smallest(x).argmax(dim=1)
    y = torch.cat([pred[:8], (pred[8:] + 1) % 10])  # right on the first half only
    module(x)
    gates = dp.gates_of(module.model)
    before = {n: g.mask.clone() for n, g in gates.items()}
    stats = module.model.bn1.running_mean.clone()
    loss, target = width_target_loss(module.terms.batch(x, y, "width"))
    assert target.tolist() == [0.0] * 8 + [1.0] * 8
    assert torch.equal(module.model.bn1.running_mean, stats)  # untouched
    assert all(torch.equal(g.mask, before[n]) and g.forced is None for n, g in gates.items())
    loss.backward()
    assert all(g.fc2.weight.grad.abs().sum() > 0 for g in gates.values())
    with pytest.raises(ValueError, match="width_targets needs width sites: set granularity='width'"):
        dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, width_mult=0.5, width_targets=1.0)


def test_gate_targets_train_through_the_module() -> None:
    L.seed_everything(0)
    module = dp.GatedClassifier("resnet20", gate="sigmoid", granularity="width", input_size=8, width_mult=0.5,
                                width_targets=0.5, target=0.5)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, **quiet_trainer_kwargs())
    trainer.fit(module, dp.DigitsDataModule(batch_size=32))
    assert trainer.callback_metrics["train/width_targets"] > 0
