"""Static pruning: exact sparsity per method, masks survive fine-tuning, schedules, and physical
channel removal that keeps the outputs while cutting FlopCounterMode FLOPs."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

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
    make_permanent,
    measure_latency,
    param_counts,
    prune_model,
    remove_channels,
    sparsity_schedule,
    train_epochs,
    weight_layers,
    write_table,
)

STRUCTURED = ["l1_structured", "l2_structured", "random_structured"]
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
    groups = {g.producer: g for g in channel_groups(model)}
    for name, frac in channel_sparsity(model).items():
        conv = model.get_submodule(name)
        c = conv.weight.shape[0]
        assert frac == round(0.5 * c) / c, name
        dead = conv.weight.flatten(1).abs().amax(1) == 0
        norm = model.get_submodule(groups[name].norm)
        assert torch.all(norm.weight[dead] == 0) and torch.all(norm.bias[dead] == 0)
        assert torch.all(norm.weight[~dead] != 0)
        if method != "random_structured":
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


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("lenet5", {}), ("lenet300_100", {}), ("vgg11", {"width_mult": 0.125}), ("resnet20", {}),
     ("resnet20", {"width_mult": 0.5, "shortcut": "B"})],
)
def test_remove_channels_matches_masked_model_with_fewer_flops(name: str, kwargs: dict) -> None:
    model = _randomize_norms(B.create(name, **kwargs))
    prune_model(model, "l1_structured", 0.25)
    prune_model(model, "l1_structured", 0.5)
    small = remove_channels(model)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)
    for g in channel_groups(model):
        c = model.get_submodule(g.producer).weight.shape[0]
        assert small.get_submodule(g.producer).weight.shape[0] == c - round(0.5 * c)
    dense, pruned = count_flops(model, (1, 28, 28))[0], count_flops(small, (1, 28, 28))[0]
    assert pruned < 0.6 * dense
    assert param_counts(small)["stored"] < param_counts(model)["stored"]
    assert any(n.endswith("_orig") for n, _ in model.named_parameters())  # the input model is untouched


def test_resnet_removal_keeps_block_outputs() -> None:
    model = B.create("resnet20")
    prune_model(model, "random_structured", 0.75)
    small = remove_channels(model)
    assert [b.conv1.out_channels for b in small.layer3] == [16, 16, 16]
    assert [b.conv2.out_channels for b in small.layer3] == [64, 64, 64]


def test_remove_channels_rejects_unsupported_nets() -> None:
    with pytest.raises(ValueError, match="cannot group channels of InvertedResidual"):
        remove_channels(B.create("mobilenetv2", width_mult=0.25))


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
    assert 0 < measure_latency(model, (1, 28, 28), min_run_time=0.05) < 0.1
    small = B.create("lenet300_100", width_mult=0.25)
    lat = compare_latency({"big": model, "small": small}, (1, 28, 28), repeats=2, min_run_time=0.05, batch_size=64)
    assert list(lat) == ["big", "small"] and 0 < lat["small"] < lat["big"]
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        compare_latency({"big": model}, (1, 28, 28), repeats=0)


def test_fraction_for_flops_hits_the_reduction() -> None:
    model = B.create("lenet5")
    fraction = fraction_for_flops(model, 2.0, (1, 28, 28), tol=0.02)
    dense = count_flops(model, (1, 28, 28))[0]
    flops = count_flops(remove_channels(prune_model(B.create("lenet5"), "l1_structured", fraction)), (1, 28, 28))[0]
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
    )
    cli = cli_main(["fit", "--config", str(config)])
    assert [c.rounds_done for c in cli.trainer.callbacks if isinstance(c, StaticPruning)] == [2]
    model = cli.model.model
    assert channel_sparsity(model) == {"features.0": 0.5, "features.3": 0.5, "classifier.1": 0.5,
                                       "classifier.3": 0.5}
    small = remove_channels(model)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model.eval()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["configs/static_l1_filter.yaml", "configs/static_l1_unstructured.yaml",
                                  "configs/static_random_filter.yaml"])
def test_static_configs_parse(path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["dynprune"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "dynprune.static.StaticPruning" in capsys.readouterr().out
