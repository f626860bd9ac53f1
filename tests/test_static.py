"""Static pruning: exact sparsity per method, masks survive fine-tuning, schedules, and physical
channel removal that keeps the outputs while cutting FlopCounterMode FLOPs."""

from __future__ import annotations

import io
import json
import sys
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
    channel_groups,
    channel_sparsity,
    compare_latency,
    fraction_for_flops,
    global_sparsity,
    iterative_prune,
    layer_sparsity,
    list_pruners,
    load_pruned_state_dict,
    make_permanent,
    measure_latency,
    param_counts,
    physical_flops,
    prune_model,
    remove_channels,
    sparsity_schedule,
    train_epochs,
    weight_layers,
    write_table,
)

STRUCTURED = ["group_norm", "l1_structured", "l2_structured", "random_structured"]
# Smaller widths / depths keep the tests fast; a backbone not listed here is tested at its defaults.
FAST = {"mobilenetv2": {"width_mult": 0.5}, "resnet56": {"width_mult": 0.5}, "vgg11": {"width_mult": 0.125},
        "vgg16": {"width_mult": 0.125}}


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


def _models() -> list:
    """Every registered backbone (smaller where FAST says so) and the user model."""
    return [pytest.param(lambda n=name: B.create(n, **FAST.get(n, {})), id=name) for name in B.list_backbones()] + [
        pytest.param(lambda: _with_shape(UserNet()), id="user_net")]


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
    prune_model(model, method, 0.25)
    prune_model(model, method, 0.5)
    assert [g.root for g in channel_groups(model)] == [f"features.{i}" for i in (0, 4, 8, 11, 15, 18, 22, 25)]
    for name, frac in channel_sparsity(model).items():
        conv = model.get_submodule(name)
        c = conv.weight.shape[0]
        assert frac == round(0.5 * c) / c, name
        dead = conv.weight.flatten(1).abs().amax(1) == 0
        norm = model.get_submodule(f"features.{int(name.split('.')[1]) + 1}")  # the BatchNorm after it
        assert torch.all(norm.weight[dead] == 0) and torch.all(norm.bias[dead] == 0)
        assert torch.all(norm.weight[~dead] != 0)
        if method == "group_norm":  # Torch-Pruning's score: conv rows, BN entries and next layer's inputs
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
    train_epochs(model, dm.train_dataloader(), 1, 0.05, weight_decay=1e-2)
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
    train_epochs(model, dm.train_dataloader(), 3, 1e-2, optimizer="adam")
    logged = []
    results = iterative_prune(model, "l1_unstructured", [0.5, 0.8], dm.train_dataloader(), dm.val_dataloader(),
                              epochs=1, lr=3e-3, log=logged.append, optimizer="adam")
    assert logged == results and [r.round for r in results] == [0, 1]
    total = sum(m.weight.numel() for m in weight_layers(model).values())
    expected = sum(round(0.8 * m.weight.numel()) for m in weight_layers(model).values()) / total
    assert results[-1].sparsity == expected
    assert [r.target for r in results] == [0.5, 0.8]
    assert all(r.acc_finetuned >= r.acc_pruned for r in results) and results[-1].acc_finetuned > 0.9


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:channel groups rooted at")
@pytest.mark.parametrize("make", _models())
def test_remove_channels_matches_masked_model_with_fewer_flops(make, tmp_path: Path) -> None:
    model = _randomize_norms(make())
    shape = model.input_shape
    prune_model(model, "l1_structured", 0.25)
    prune_model(model, "l1_structured", 0.5)
    small = remove_channels(model)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert_close_rounding(small(x), model(x), depth=weight_depth(model))
    for g in channel_groups(model):  # every group root lost exactly half its channels
        assert small.get_submodule(g.root).weight.shape[0] == g.channels - round(0.5 * g.channels), g.root
    dense, per_dense = count_flops(model, shape)
    pruned, per_small = count_flops(small, shape)
    for name, layer in weight_layers(small).items():  # each layer's FLOPs scale with its weights (kept in x out)
        full = model.get_submodule(name).weight
        assert per_small[name] == pytest.approx(per_dense[name] * layer.weight.numel() / full.numel(), rel=1e-9)
    assert pruned < 0.7 * dense
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
    with pytest.warns(UserWarning, match=r"groups rooted at \['stem.0', 'project'\] are not prunable"):
        groups = channel_groups(_with_shape(UserNet()))  # both feed / are fed by the grouped conv
    assert [(g.root, g.channels, {m.name for m in g.members}) for g in groups] == [
        ("depthwise", 64, {"expand", "bn_e", "depthwise", "bn_d"})]


def test_resnet_removal_keeps_block_outputs() -> None:
    model = B.create("resnet20")
    with pytest.warns(UserWarning, match=r"groups rooted at \['conv1'\] are not prunable"):
        channel_groups(B.create("resnet20", width_mult=0.75))  # option A pads channels: Torch-Pruning can't map
    prune_model(model, "random_structured", 0.75)
    small = remove_channels(model)
    assert [b.conv1.out_channels for b in small.layer3] == [16, 16, 16]
    assert [b.conv2.out_channels for b in small.layer3] == [64, 64, 64]
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
    assert measure_latency(model, (1, 28, 28), min_run_time=0.01) > 0
    small = B.create("lenet300_100", width_mult=0.25)
    lat = compare_latency({"big": model, "small": small}, (1, 28, 28), repeats=2, min_run_time=0.01)
    assert list(lat) == ["big", "small"] and all(v > 0 for v in lat.values())
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        compare_latency({"big": model}, (1, 28, 28), repeats=0)


def test_fraction_for_flops_hits_the_reduction() -> None:
    model = B.create("lenet5")
    fraction = fraction_for_flops(model, 2.0, (1, 28, 28), tol=0.02)
    dense = count_flops(model, (1, 28, 28))[0]
    flops = physical_flops(prune_model(B.create("lenet5"), "l1_structured", fraction))
    assert dense / 2.2 < flops <= dense / 2
    with pytest.raises(ValueError, match="ratio must be > 1, got 0.5"):
        fraction_for_flops(model, 0.5, (1, 28, 28))


def test_static_pruning_callback_through_the_cli(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["dynprune"])
    config = tmp_path / "static.yaml"
    config.write_text(
        "seed_everything: 0\n"
        "model: {backbone: lenet5, gate: null, input_size: 16, lr: 0.05}\n"
        "data: {class_path: dynprune.data.DigitsDataModule, init_args: {batch_size: 64, input_size: 16}}\n"
        f"trainer: {{max_epochs: 3, limit_train_batches: 2, limit_val_batches: 1, logger: false,\n"
        f"  enable_progress_bar: false, enable_model_summary: false, default_root_dir: '{tmp_path}',\n"
        "  callbacks: [{class_path: dynprune.static.StaticPruning,\n"
        "               init_args: {method: l1_structured, final: 0.5, start: 0.25, step: 0.25}}]}\n"
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
