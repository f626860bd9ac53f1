"""Static pruning: exact sparsity per method, masks survive fine-tuning, schedules, and physical
channel removal that keeps the outputs while cutting FlopCounterMode FLOPs."""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rounding, weight_depth
from torch import Tensor, nn

import dynprune.backbones as B
from dynprune.cli import cli_main
from dynprune.data import DigitsDataModule
from dynprune.flops import count_flops
from dynprune.static import (
    StaticPruning,
    accuracy,
    channel_groups,
    channel_sparsity,
    compare_latency,
    finetune,
    fraction_for_flops,
    global_sparsity,
    iterative_prune,
    layer_sparsity,
    list_criteria,
    list_pruners,
    load_pruned_state_dict,
    make_permanent,
    param_counts,
    physical_flops,
    prune_model,
    prune_to_flops,
    remove_channels,
    sparsity_schedule,
    weight_layers,
    write_table,
)
from dynprune.static.shortcuts import ChannelPad

STRUCTURED = ["group_norm", "l1_structured", "l2_structured", "random_structured", "taylor"]
# Smaller widths / depths keep the tests fast; a backbone not listed here is tested at its defaults.
FAST = {"mobilenetv2": {"width_mult": 0.5}, "resnet56": {"width_mult": 0.5}, "vgg11": {"width_mult": 0.125},
        "vgg16": {"width_mult": 0.125}}
# ViTs: only the MLP hidden units form channel groups (the embedding stream runs through LayerNorm, whose
# statistics a removed channel would change; attention heads need head-aware groups).
FLOPS_LEFT = {"vit_p2": 0.8, "vit_p4": 0.8}


class UserNet(nn.Module):
    """A user model: stem, grouped conv, an inverted residual block (expand, depthwise, project), head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, groups=4, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.expand, self.bn_e = nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64)
        self.depthwise, self.bn_d = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), nn.BatchNorm2d(64)
        self.project, self.bn_p = nn.Conv2d(64, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, 28, 28) -> (N, 10)."""
        x = self.grouped(self.stem(x))
        y = F.relu6(self.bn_d(self.depthwise(F.relu6(self.bn_e(self.expand(x))))))
        x = x + self.bn_p(self.project(y))
        return self.head(x.mean((2, 3)))


class SigmoidNet(nn.Module):
    """Every channel goes through a sigmoid: a zero channel outputs 0.5, so no channel can be removed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, H, W) -> (N, 10)."""
        return self.fc(torch.sigmoid(self.conv(x)).mean((2, 3)))


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class HeldOutNet(nn.Module):
    """Held out from the library's backbones: a residual over two grouped convs (ResNeXt-like), an inverted
    residual with a depthwise conv (MobileNetV2-like) and a grouped, strided conv before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 32)
        self.g1, self.g2 = _conv_bn(32, 32, groups=4), _conv_bn(32, 32, groups=4)
        self.expand, self.dw, self.project = _conv_bn(32, 96, 1), _conv_bn(96, 96, groups=96), _conv_bn(96, 32, 1)
        self.down = _conv_bn(32, 64, stride=2, groups=4)
        self.head = nn.Linear(64, 10)
        self.input_shape = (3, 32, 32)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, 32, 32) -> (N, 10)."""
        x = F.relu(self.stem(x))
        x = F.relu(x + self.g2(F.relu(self.g1(x))))
        x = x + self.project(F.relu6(self.dw(F.relu6(self.expand(x)))))
        return self.head(F.relu(self.down(x)).mean((2, 3)))


def _models() -> list:
    """Every registered backbone (smaller where FAST says so) and the user model, each with the most of its
    FLOPs that half of every channel group may leave."""
    return [pytest.param(lambda n=name: B.create(n, **FAST.get(n, {})), FLOPS_LEFT.get(name, 0.7), id=name)
            for name in B.list_backbones()] + [pytest.param(lambda: _with_shape(UserNet()), 0.7, id="user_net")]


def _with_shape(model: nn.Module) -> nn.Module:
    model.input_shape = (1, 28, 28)
    return model
PER_LAYER = ["l1_unstructured", "random_unstructured"]
GLOBAL = ["global_l1_unstructured", "global_random_unstructured"]


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so removal has something to get wrong."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model.eval()


def test_registry_lists_every_method() -> None:
    assert list_pruners() == sorted(STRUCTURED + PER_LAYER + GLOBAL)
    assert list_criteria() == STRUCTURED
    with pytest.raises(ValueError, match=r"criterion 'taylor' scores channels with loss gradients: pass batch"):
        prune_model(B.create("lenet5"), "taylor", 0.5)
    with pytest.raises(ValueError, match="unknown pruning method 'l3'.*l1_structured"):
        prune_model(B.create("lenet5"), "l3", 0.5)


@pytest.mark.parametrize("method", PER_LAYER)
def test_per_layer_unstructured_sparsity_is_exact_and_grows(method: str) -> None:
    model = B.create("lenet5")
    for amount in (0.3, 0.55):
        prune_model(model, method, amount)
        for name, m in weight_layers(model).items():
            assert int((m.weight == 0).sum()) == round(amount * m.weight.numel()), name
    if method == "l1_unstructured":
        for m in weight_layers(model).values():
            pruned = m.weight_mask == 0
            assert m.weight_orig[pruned].abs().max() <= m.weight_orig[~pruned].abs().min()


@pytest.mark.parametrize("method", GLOBAL)
def test_global_unstructured_sparsity_is_exact(method: str) -> None:
    model = B.create("lenet5")
    prune_model(model, method, 0.2)
    prune_model(model, method, 0.7)
    total = sum(m.weight.numel() for m in weight_layers(model).values())
    assert global_sparsity(model) == round(0.7 * total) / total
    if method == "global_l1_unstructured":  # one threshold for all layers: layers differ in sparsity
        assert len(set(layer_sparsity(model).values())) > 1


@pytest.mark.parametrize("method", STRUCTURED)
def test_structured_prunes_exact_channels_with_coupled_norm(method: str) -> None:
    model = B.create("vgg11", width_mult=0.25)
    batch = (torch.randn(8, *model.input_shape), torch.arange(8))  # read by the gradient criterion (taylor) only
    prune_model(model, method, 0.25, batch=batch)
    prune_model(model, method, 0.5, batch=batch)
    assert [g.root for g in channel_groups(model)] == [f"features.{i}" for i in (0, 4, 8, 11, 15, 18, 22, 25)]
    for name, frac in channel_sparsity(model).items():
        conv = model.get_submodule(name)
        c = conv.weight.shape[0]
        assert frac == round(0.5 * c) / c, name
        dead = conv.weight.flatten(1).abs().amax(1) == 0
        norm = model.get_submodule(f"features.{int(name.split('.')[1]) + 1}")  # the BatchNorm after it
        assert torch.all(norm.weight[dead] == 0) and torch.all(norm.bias[dead] == 0)
        assert torch.all(norm.weight[~dead] != 0)
        if method in ("group_norm", "taylor"):  # Torch-Pruning's scores over the whole group
            assert int(dead.sum()) == round(0.5 * c)
        elif method != "random_structured":
            p = 1 if method == "l1_structured" else 2
            norms = conv.weight_orig.flatten(1).norm(p=p, dim=1)
            assert norms[dead].max() <= norms[~dead].min()


def test_per_layer_mapping_and_bad_amounts() -> None:
    model = B.create("lenet300_100")
    prune_model(model, "l1_unstructured", {"net.1": 0.9, "net.5": 0.25})
    assert layer_sparsity(model) == {"net.1": 0.9, "net.3": 0.0, "net.5": 0.25}
    with pytest.raises(ValueError, match=r"cannot prune layer\(s\) \['net.2'\]; choose from: net.1, net.3, net.5"):
        prune_model(model, "l1_unstructured", {"net.2": 0.5})
    with pytest.raises(ValueError, match=r"amount for 'net.1' must be in \[0, 1\), got 1.0"):
        prune_model(model, "l1_unstructured", 1.0)
    with pytest.raises(ValueError, match="'net.1' already has 211680/235200 pruned, more than the 0.5 asked"):
        prune_model(model, "l1_unstructured", 0.5)
    with pytest.raises(ValueError, match="global pruning takes one float"):
        prune_model(model, "global_l1_unstructured", {"net.1": 0.5})
    with pytest.raises(ValueError, match="would prune all 100 channels of 'net.3'"):
        prune_model(model, "l1_structured", {"net.3": 0.999})
    with pytest.raises(ValueError, match=r"cannot prune layer\(s\) \['net.5'\]; choose from: net.1, net.3"):
        prune_model(model, "l1_structured", {"net.5": 0.5})  # the logits are not a prunable group
    with pytest.raises(ValueError, match=r"UserNet has no input_shape attribute; pass input_shape=\(C, H, W\)"):
        prune_model(UserNet(), "l1_structured", 0.5)


def test_pruned_weights_stay_zero_through_finetuning() -> None:
    dm = DigitsDataModule(input_size=16)
    dm.setup()
    model = B.create("lenet5", input_size=16)
    prune_model(model, "l1_unstructured", 0.6)
    prune_model(model, "l1_structured", 0.25)
    before = {n: m.weight.detach().clone() for n, m in weight_layers(model).items()}
    finetune(model, dm, 1, 0.05, weight_decay=1e-2)
    for name, m in weight_layers(model).items():
        zero = before[name] == 0
        assert torch.all(m.weight[zero] == 0), name
        assert not torch.equal(m.weight[~zero], before[name][~zero]), name
    make_permanent(model)
    assert not any(n.endswith("_orig") for n, _ in model.named_parameters())
    assert all(int((m.weight == 0).sum()) == int((before[n] == 0).sum()) for n, m in weight_layers(model).items())


def test_sparsity_schedule_defaults_one_shot_and_per_layer() -> None:
    assert sparsity_schedule() == pytest.approx([0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5], abs=1e-12)
    assert sparsity_schedule(0.5, start=0.5) == [0.5]
    assert sparsity_schedule(0.42, start=0.3, step=0.1) == pytest.approx([0.3, 0.4, 0.42])
    rounds = sparsity_schedule({"a": 0.8, "b": 0.4}, start=0.4, step=0.2)
    assert rounds == [{"a": 0.4, "b": 0.2}, {"a": 0.6, "b": 0.3}, {"a": 0.8, "b": 0.4}]
    with pytest.raises(ValueError, match="start=0.6, final=0.5"):
        sparsity_schedule(0.5, start=0.6)


def test_iterative_prune_logs_each_round_at_the_asked_sparsity() -> None:
    dm = DigitsDataModule(input_size=8)
    dm.setup()
    model = B.create("lenet300_100", input_size=8)
    finetune(model, dm, 3, 1e-2, optimizer="adam")
    logged = []
    results = iterative_prune(model, "l1_unstructured", [0.5, 0.8], dm, epochs=1, lr=3e-3, log=logged.append,
                              optimizer="adam")
    assert logged == results and [r.round for r in results] == [0, 1]
    total = sum(m.weight.numel() for m in weight_layers(model).values())
    expected = sum(round(0.8 * m.weight.numel()) for m in weight_layers(model).values()) / total
    assert results[-1].sparsity == expected
    assert [r.target for r in results] == [0.5, 0.8]
    assert all(r.acc_finetuned >= r.acc_pruned for r in results) and results[-1].acc_finetuned > 0.9
    with torch.no_grad():  # the task's metric: class-averaged top-1 accuracy over the whole split
        pairs = [(model(x).argmax(1), y) for x, y in dm.val_dataloader()]
    pred, label = torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])
    recall = [float((pred[label == c] == c).float().mean()) for c in label.unique()]
    assert accuracy(model, dm, "val") == pytest.approx(sum(recall) / len(recall), rel=1e-6)
    with pytest.raises(ValueError, match="unknown split 'train'; choose one of: val, test"):
        accuracy(model, dm, "train")


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:channel groups rooted at")
@pytest.mark.parametrize(("make", "flops_left"), _models())
def test_remove_channels_matches_masked_model_with_fewer_flops(make, flops_left: float, tmp_path: Path) -> None:
    model = _randomize_norms(make())
    shape = model.input_shape
    prune_model(model, "l1_structured", 0.25)
    prune_model(model, "l1_structured", 0.5)
    small = remove_channels(model)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert_close_rounding(small(x), model(x), depth=weight_depth(model))
    for g in channel_groups(model):  # every group root lost exactly half its channels (of each conv group)
        kept = g.channels - g.conv_groups * round(0.5 * g.block)
        assert small.get_submodule(g.root).weight.shape[0] == kept, g.root
    dense, per_dense = count_flops(model, shape)
    pruned, per_small = count_flops(small, shape)
    for name, layer in weight_layers(small).items():  # each layer's FLOPs scale with its weights (kept in x out)
        full = model.get_submodule(name).weight
        assert per_small[name] == pytest.approx(per_dense[name] * layer.weight.numel() / full.numel(), rel=1e-9)
    assert pruned < flops_left * dense
    assert physical_flops(model) == pruned
    assert param_counts(small)["stored"] < param_counts(model)["stored"]
    assert any(n.endswith("_orig") for n, _ in model.named_parameters())  # the input model is untouched
    buffer = io.BytesIO()
    torch.save(small.state_dict(), buffer)
    buffer.seek(0)
    fresh = load_pruned_state_dict(make(), torch.load(buffer))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), small(x), atol=0, rtol=0)


def test_user_net_groups_follow_residual_grouped_and_depthwise_convs() -> None:
    groups = channel_groups(_with_shape(UserNet()))
    assert [(g.root, g.channels, g.conv_groups, {m.name for m in g.members}) for g in groups] == [
        ("stem.0", 16, 4, {"stem.0", "stem.1"}),  # read by the grouped conv: 4 blocks of 4 channels
        ("depthwise", 64, 1, {"expand", "bn_e", "depthwise", "bn_d"}),
        ("project", 32, 4, {"grouped.0", "grouped.1", "project", "bn_p"})]  # the residual sum


def _flops_removed_and_outputs(model: nn.Module, method: str, amount: float) -> tuple[float, nn.Module, nn.Module]:
    """(fraction of FLOPs removed, masked model, physically pruned model) after ``method`` at ``amount``."""
    masked = prune_model(_randomize_norms(model), method, amount)
    small = remove_channels(masked)
    return 1 - count_flops(small, model.input_shape)[0] / count_flops(model, model.input_shape)[0], masked, small


@pytest.mark.parametrize("method", ["l1_structured", "group_norm"])
def test_half_pruning_of_a_held_out_residual_grouped_depthwise_net_removes_40_percent(method: str) -> None:
    removed, masked, small = _flops_removed_and_outputs(HeldOutNet(), method, 0.5)
    assert removed >= 0.4
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = masked(x), small(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert [(small.g1[0].groups, small.g1[0].in_channels, small.down[0].out_channels, small.dw[0].groups)] == [
        (4, 16, 32, 48)]  # grouped convs keep 4 groups of half the width; the depthwise conv follows its input


@pytest.mark.parametrize(("name", "kwargs", "floor"), [
    ("resnet20", {}, 0.7), ("resnet56", {"width_mult": 0.5}, 0.7), ("mobilenetv2", {"width_mult": 0.5}, 0.6)])
def test_half_pruning_of_library_backbones_removes_their_flops(name: str, kwargs: dict, floor: float) -> None:
    """ResNets lose half of every channel, residual streams included; MobileNetV2 its depthwise groups too."""
    removed, _, _ = _flops_removed_and_outputs(B.create(name, **kwargs), "l1_structured", 0.5)
    assert removed >= floor


@pytest.mark.parametrize(("make", "ratio", "criterion"), [
    (HeldOutNet, 4.0, "l1_structured"), (HeldOutNet, 8.0, "group_norm"), (HeldOutNet, 4.0, "taylor"),
    (lambda: B.create("resnet20", width_mult=0.5), 4.0, "group_norm"),
    (lambda: B.create("resnet20", width_mult=0.5), 32.0, "l1_structured"),
    pytest.param(lambda: B.create("resnet56", width_mult=0.5), 8.0, "l1_structured", marks=pytest.mark.slow),
    (lambda: B.create("mobilenetv2", width_mult=0.5), 16.0, "group_norm")])
def test_prune_to_flops_lands_within_3_percent_of_one_over_r(make, ratio: float, criterion: str) -> None:
    model = make()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randn(16, *model.input_shape, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10)
    thin = prune_to_flops(model, ratio, criterion, batch=batch)
    dense, flops = count_flops(model, model.input_shape)[0], count_flops(thin, model.input_shape)[0]
    report = thin.pruning_report
    assert (report["dense_flops"], report["flops"], report["criterion"]) == (dense, flops, criterion)
    assert report["flops_ratio"] == flops / dense and abs(flops / dense * ratio - 1) <= 0.03
    assert thin.input_shape == model.input_shape
    assert all(torch.equal(v, dense_state[k]) for k, v in model.state_dict().items())  # the input is untouched
    with torch.no_grad():
        assert thin.eval()(batch[0]).shape == (16, 10)


def test_a_thin_model_distils_from_its_dense_teacher_through_the_lightning_loop() -> None:
    """The benchmark's static arm: ``prune_to_flops``, then ``GatedClassifier(thin, gate=None, teacher=dense)``."""
    dense = B.create("resnet20", input_size=8, width_mult=0.25)
    thin = prune_to_flops(dense, 2.0, "group_norm")  # its residual streams pruned through ChannelPad shortcuts
    before = {k: v.clone() for k, v in thin.state_dict().items()}
    finetune(thin, DigitsDataModule(input_size=8), 1, 0.05, teacher=dense, distill=1.0, trainer={"max_steps": 3})
    assert any(not torch.equal(v, before[k]) for k, v in thin.state_dict().items() if k.endswith("weight"))
    assert count_flops(thin, thin.input_shape)[0] == thin.pruning_report["flops"]  # trained, still as thin


def test_prune_to_flops_rejects_unreachable_ratios() -> None:
    with pytest.raises(ValueError, match=r"reduces its FLOPs [0-9.]+x, short of 1000.0x"):
        prune_to_flops(HeldOutNet(), 1000.0)  # one channel per conv group is left
    with pytest.raises(ValueError, match="ratio must be > 1, got 1.0"):
        prune_to_flops(HeldOutNet(), 1.0)
    with pytest.raises(ValueError, match=r"tol is a relative FLOPs tolerance in \(0, 1\), got 0"):
        prune_to_flops(HeldOutNet(), 2.0, tol=0)
    with pytest.raises(ValueError, match="unknown structured criterion 'l1'; choose one of: group_norm"):
        prune_to_flops(HeldOutNet(), 2.0, "l1")


def test_resnet_option_a_residual_streams_are_pruned_through_their_zero_padding_shortcuts() -> None:
    model = B.create("resnet20")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every group is prunable: no "not prunable" warning
        roots = [g.root for g in channel_groups(model)]
    assert roots[:2] == ["conv1", "layer1.0.conv1"] and {"layer2.0.conv2", "layer3.0.conv2"} <= set(roots)
    assert isinstance(model.layer2[0].downsample, ChannelPad)  # made explicit, in place, same function
    prune_model(_randomize_norms(model), "random_structured", 0.75)
    small = remove_channels(model)
    assert [(b.conv1.out_channels, b.conv2.out_channels) for b in small.layer3] == [(16, 16)] * 3
    pad = small.layer2[0].downsample  # 4 stage-1 stream channels are left, 8 of stage 2's
    kept = pad.src[pad.src >= 0].tolist()  # the kept stage-2 channels that copy a kept stage-1 channel
    assert (pad.in_channels, len(pad.src)) == (4, 8) and len(set(kept)) == len(kept) and set(kept) <= {0, 1, 2, 3}
    projection = B.create("resnet20", shortcut="B")  # with projections the residual stream is a group too
    assert [g.root for g in channel_groups(projection)][:3] == ["conv1", "layer1.0.conv1", "layer1.1.conv1"]


def test_remove_channels_rejects_models_it_cannot_group() -> None:
    with pytest.raises(ValueError, match="no channel group of SigmoidNet can be removed without changing its "
                                         r"outputs \(checked: conv\)"):
        prune_model(SigmoidNet(), "l1_structured", 0.5, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="cannot trace the channel dependencies of UserNet"):
        remove_channels(UserNet(), input_shape=(3, 28, 28))  # the stem reads one channel


def test_param_counts_table_and_latency(tmp_path) -> None:
    model = B.create("lenet300_100")
    prune_model(model, "l1_unstructured", 0.5)
    counts = param_counts(model)
    weights = sum(m.weight.numel() for m in weight_layers(model).values())
    assert counts["stored"] == 266610
    assert counts["stored"] - counts["nonzero"] == sum(round(0.5 * m.weight.numel())
                                                       for m in weight_layers(model).values())
    assert weights == 266200
    csv_path, md_path = write_table([{"a": 1, "b": 0.5}, {"a": 2, "b": 0.25}], tmp_path / "t", title="T")
    assert csv_path.read_text() == "a,b\n1,0.5\n2,0.25\n"
    assert md_path.read_text() == "# T\n\n| a | b |\n|---|---|\n| 1 | 0.5 |\n| 2 | 0.25 |\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.md"]
    small = B.create("lenet300_100", width_mult=0.25)
    lat = compare_latency({"big": model, "small": small}, (1, 28, 28), repeats=2, min_run_time=0.01)
    assert list(lat) == ["big", "small"]
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        compare_latency({"big": model}, (1, 28, 28), repeats=0)


def test_fraction_for_flops_hits_the_reduction() -> None:
    model = B.create("lenet5")
    fraction = fraction_for_flops(model, 2.0, (1, 28, 28), tol=0.02)
    dense = count_flops(model, (1, 28, 28))[0]
    flops = physical_flops(prune_model(B.create("lenet5"), "l1_structured", fraction))
    assert abs(flops / dense * 2 - 1) <= 0.02
    with pytest.raises(ValueError, match="ratio must be > 1, got 0.5"):
        fraction_for_flops(model, 0.5, (1, 28, 28))


@pytest.mark.parametrize("method", ["l1_structured", "taylor"])  # taylor scores on the latest training batch
def test_static_pruning_callback_through_the_cli(method: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["dynprune"])
    config = tmp_path / "static.yaml"
    config.write_text(
        "seed_everything: 0\n"
        "model: {backbone: lenet5, gate: null, input_size: 16, lr: 0.05}\n"
        "data: {class_path: dynprune.data.DigitsDataModule, init_args: {batch_size: 64, input_size: 16}}\n"
        f"trainer: {{max_epochs: 3, limit_train_batches: 2, limit_val_batches: 1, logger: false,\n"
        f"  enable_progress_bar: false, enable_model_summary: false, default_root_dir: '{tmp_path}',\n"
        "  callbacks: [{class_path: dynprune.static.StaticPruning,\n"
        f"               init_args: {{method: {method}, final: 0.5, start: 0.25, step: 0.25}}}}]}}\n"
        f"flops: {{dirpath: '{tmp_path}'}}\n"
    )
    cli = cli_main(["fit", "--config", str(config)])
    assert [c.rounds_done for c in cli.trainer.callbacks if isinstance(c, StaticPruning)] == [2]
    model = cli.model.model
    assert channel_sparsity(model) == {"features.0": 0.5, "features.3": 0.5, "classifier.1": 0.5,
                                       "classifier.3": 0.5}
    small = remove_channels(model)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert_close_rounding(small.eval()(x), model.eval()(x), depth=weight_depth(model))
    report = json.loads((tmp_path / "flops.json").read_text())["val"]
    dense, pruned = count_flops(model, (1, 16, 16))[0], count_flops(small, (1, 16, 16))[0]
    assert report["dense_flops"] == dense and pruned < 0.4 * dense  # half of every group: about a third left
    assert report["summary"]["flops_mean"] == pruned
    assert report["summary"]["flops_mean_ratio"] == pytest.approx(pruned / dense)


@pytest.mark.parametrize("path", ["configs/static_l1_filter.yaml", "configs/static_l1_unstructured.yaml",
                                  "configs/static_random_filter.yaml", "configs/static_group_norm.yaml"])
def test_static_configs_parse(path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["dynprune"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "dynprune.static.StaticPruning" in capsys.readouterr().out


def test_mobilenetv2_group_norm_through_the_cli_reports_physical_flops(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["dynprune"])
    cli = cli_main(["fit", "--config", "configs/static_group_norm.yaml", "--model.backbone=mobilenetv2",
                    "--model.width_mult=0.5", "--model.input_size=16", "--trainer.max_epochs=2",
                    "--trainer.callbacks.init_args.start_epoch=0", "--trainer.limit_train_batches=2",
                    "--trainer.limit_val_batches=1", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false", "--test_after_fit=false",
                    "--data=dynprune.data.DigitsDataModule", "--data.init_args.input_size=16",
                    f"--trainer.default_root_dir={tmp_path}", f"--flops.dirpath={tmp_path}"])
    model = cli.model.model
    assert set(channel_sparsity(model).values()) == {0.5} and len(channel_sparsity(model)) == 14
    report = json.loads((tmp_path / "flops.json").read_text())["val"]
    assert report["summary"]["flops_mean"] == physical_flops(model) < 0.6 * report["dense_flops"]
