"""Reliability guarantees, one test each: determinism, exact resume, loading, collapse/NaN guard,
input validation, atomic outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from conftest import assert_close_rounding, quiet_trainer_kwargs, weight_depth
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import dynprune as dp
from dynprune.cli import cli_main
from dynprune.guard import CollapseGuard, GuardError, skippable_sites
from dynprune.io import read_checkpoint, write_json
from dynprune.static import prune_model

CONF = Path(__file__).parent / "conf"


def _module(gate: str = "sigmoid", **kwargs: Any) -> dp.GatedClassifier:
    """A small gated ResNet-20 for the 8x8 digits."""
    return dp.GatedClassifier("resnet20", gate=gate, input_size=8, width_mult=0.5, lr=0.05, **kwargs)


def _trainer(root: Path, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    args = dict(max_epochs=1, limit_train_batches=3, limit_val_batches=2, deterministic=True,
                default_root_dir=root, callbacks=callbacks,
                enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    args.update(kwargs)
    return L.Trainer(**quiet_trainer_kwargs(**args))


# -- determinism -----------------------------------------------------------------------------------

def _seeded_run(root: Path) -> tuple[dict[str, float], dict[str, Any], dict[str, torch.Tensor]]:
    L.seed_everything(0)
    module = _module(gate_kwargs={"init_bias": 0.0})
    cb = dp.FlopsCallback(dirpath=str(root), plot=False, verbose=False)
    trainer = _trainer(root, [cb], max_epochs=2)
    trainer.fit(module, dp.DigitsDataModule(batch_size=64))
    return {k: v.item() for k, v in trainer.callback_metrics.items()}, cb.reports["val"], module.state_dict()


def test_same_seed_and_config_give_identical_metrics_and_flops_stats(tmp_path: Path) -> None:
    metrics_a, report_a, state_a = _seeded_run(tmp_path / "a")
    metrics_b, report_b, state_b = _seeded_run(tmp_path / "b")
    assert metrics_a == metrics_b
    assert report_a == report_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert 0 < report_a["summary"]["flops_mean_ratio"] < 1  # gates at init_bias 0 really vary per input
    assert report_a["summary"]["flops_min"] < report_a["summary"]["flops_max"]


# -- resume ----------------------------------------------------------------------------------------

class _Kill(L.Callback):
    """Simulates a crash at the start of epoch ``k``, after epoch k-1's checkpoint was written."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.k:
            raise SystemError("killed")


def _policy_run(root: Path, data: type[dp.DigitsDataModule], kill: int | None = None,
                ckpt_path: str | None = None) -> dp.GatedClassifier:
    L.seed_everything(0)
    module = _module("policy", gate_kwargs={"init_bias": 0.5})
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True), CollapseGuard()] + ([_Kill(kill)] if kill else [])
    trainer = _trainer(root, callbacks, max_epochs=3, limit_val_batches=1)
    trainer.fit(module, data(batch_size=128), ckpt_path=ckpt_path)
    return module


def _resume_matches(tmp_path: Path, data: type[dp.DigitsDataModule]) -> None:
    full = _policy_run(tmp_path / "full", data).state_dict()
    with pytest.raises(SystemError, match="killed"):
        _policy_run(tmp_path / "resumed", data, kill=2)
    resumed = _policy_run(tmp_path / "resumed", data, ckpt_path="last").state_dict()
    assert full.keys() == resumed.keys()
    assert any(".dynprune_gate." in k for k in full)
    different = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not different, different


def test_resume_from_last_checkpoint_gives_identical_weights_baseline_and_gates(tmp_path: Path) -> None:
    _resume_matches(tmp_path, dp.DigitsDataModule)


def _warm_start_fit(root: Path, *args: str) -> Any:
    """A CLI fit of 4 epochs (2 dense, then 2 gated, distilling from the dense snapshot) with a CSVLogger."""
    return cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), "--model.dense_epochs=2",
                     "--model.distill=1.0", "--model.width_mult=0.5", "--trainer.max_epochs=4",
                     "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                     "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}",
                     f"--trainer.default_root_dir={root}", "--flops.plot=false", "--flops.verbose=false", *args])


@pytest.fixture(scope="module")
def warm_start_full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final weights of an uninterrupted :func:`_warm_start_fit`; its last.ckpt is its last epoch."""
    root = tmp_path_factory.mktemp("full")
    full = _warm_start_fit(root)
    final = read_checkpoint(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    assert (final["epoch"], final["global_step"]) == (3, 8)  # the last epoch, whichever epoch was best
    return full.model.state_dict()


@pytest.mark.parametrize("kill", [1, 3], ids=["dense_epoch", "gated_epoch"])
def test_interrupted_warm_start_resumes_from_last_through_the_cli(
        warm_start_full: dict[str, torch.Tensor], tmp_path: Path, kill: int) -> None:
    """last.ckpt is written at the end of every epoch, dense ones included: a run killed in epoch ``kill``
    resumes with ``--ckpt_path last`` from the end of epoch ``kill - 1``, in the same run folder, and ends with
    the weights of an uninterrupted run."""
    root = tmp_path / "killed"
    with pytest.raises(SystemError, match="killed"):
        _warm_start_fit(root, '--trainer.callbacks+={"class_path": "test_reliability._Kill", '
                              f'"init_args": {{"k": {kill}}}}}')
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file(), "no last.ckpt after the completed epochs"
    assert (read_checkpoint(last)["epoch"], read_checkpoint(last)["global_step"]) == (kill - 1, 2 * kill)
    resumed = _warm_start_fit(root, "--ckpt_path=last")
    assert resumed.trainer.ckpt_path == str(last) and resumed.trainer.global_step == 8
    assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_0"]
    different = [k for k, v in resumed.model.state_dict().items() if not torch.equal(v, warm_start_full[k])]
    assert not different, different


# -- loading ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_fit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """One short CLI training run of a gated ResNet-20 on digits; its CLI and last.ckpt."""
    root = tmp_path_factory.mktemp("cli")
    cli = cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), "--trainer.limit_train_batches=2",
                    "--trainer.limit_val_batches=2", f"--trainer.default_root_dir={root}",
                    f"--flops.dirpath={root}", "--flops.plot=false"])
    return cli, next(root.rglob("last.ckpt"))


_LOAD_IN_FRESH_PROCESS = """
import sys, torch
from dynprune import GatedClassifier
torch.set_num_threads(1)
module = GatedClassifier.load_from_checkpoint(sys.argv[1], map_location="cpu").eval()
with torch.no_grad():
    out = module(torch.load(sys.argv[2]))
torch.save({"state": module.state_dict(), "out": out}, sys.argv[3])
"""


@pytest.mark.numerics
def test_checkpoint_loads_in_a_fresh_process(cli_fit: tuple[Any, Path], tmp_path: Path) -> None:
    cli, ckpt = cli_fit
    x = torch.randn(8, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(ckpt), str(tmp_path / "x.pt"),
                    str(tmp_path / "out.pt")], check=True, capture_output=True)
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    trained = cli.model.state_dict()
    assert loaded["state"].keys() == trained.keys()
    assert all(torch.equal(loaded["state"][k], trained[k]) for k in trained)
    cli.model.eval()
    with torch.no_grad():
        assert_close_rounding(loaded["out"], cli.model(x), depth=weight_depth(cli.model))  # thread counts may differ


def test_cli_test_subcommand_loads_the_checkpoint(cli_fit: tuple[Any, Path], tmp_path: Path) -> None:
    fitted, ckpt = cli_fit
    cli = cli_main(["test", "--config", str(CONF / "digits_sigmoid.yaml"), "--ckpt_path", str(ckpt),
                    f"--trainer.default_root_dir={tmp_path}", f"--flops.dirpath={tmp_path}", "--flops.plot=false",
                    "--flops.verbose=false"])
    expected = fitted.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in cli.model.state_dict().items())
    assert 0 < cli.trainer.callback_metrics["test/acc"].item() <= 1
    assert json.loads((tmp_path / "flops.json").read_text())["test"]["inputs"] == 360


def test_checkpoints_load_with_weights_only(cli_fit: tuple[Any, Path]) -> None:
    ckpt = torch.load(cli_fit[1], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["gate"] == "sigmoid"
    assert any(".dynprune_gate." in k for k in ckpt["state_dict"])
    assert any(k.startswith("CollapseGuard") for k in ckpt["callbacks"])


@pytest.mark.parametrize("gate", dp.list_gates())
def test_gated_state_dict_round_trips(gate: str) -> None:
    torch.manual_seed(0)
    source = dp.gate_model(dp.backbones.create("resnet20", input_size=8, width_mult=0.5), gate, init_bias=0.0)
    torch.manual_seed(1)
    target = dp.gate_model(dp.backbones.create("resnet20", input_size=8, width_mult=0.5), gate)
    target.load_state_dict(source.state_dict())
    x = torch.randn(16, 1, 8, 8)
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(source(x), target(x))
    masks = dp.collect_masks(source), dp.collect_masks(target)
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_pruned_state_dict_round_trips() -> None:
    source = prune_model(dp.backbones.create("lenet5", input_size=16), "l1_unstructured", 0.6)
    target = prune_model(dp.backbones.create("lenet5", input_size=16), "l1_unstructured", 0.3)
    target.load_state_dict(source.state_dict())
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(source.eval()(x), target.eval()(x))
    assert torch.equal(source.features[0].weight_mask, target.features[0].weight_mask)


# -- collapse and NaN guard ------------------------------------------------------------------------

def _val_epoch(guard: CollapseGuard, keep: dict[str, list[float]], epoch: int, acc: float = 0.5,
               model: nn.Module | None = None, gates_on: bool = True) -> None:
    """One validation epoch of ``guard``: per-input kept fractions ``keep`` (or the masks of ``model``'s last
    forward) and accuracy ``acc`` on 10 classes."""
    trainer = SimpleNamespace(sanity_checking=False, world_size=1, current_epoch=epoch, datamodule=None,
                              callback_metrics={"val/acc": torch.tensor(acc)}, state=SimpleNamespace(fn="fit"))
    if model is None:  # stand-in sites 'a', 'b': plain layers, not in a residual branch
        layers = {n: SimpleNamespace(name=n, producer=None, residual=False) for n in keep}
        masks = {n: torch.tensor(v).unsqueeze(1) for n, v in keep.items()}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("dynprune.guard.gating_info",
                       lambda m: SimpleNamespace(layers=layers, bypassed=[], switch=SimpleNamespace(enabled=gates_on)))
            mp.setattr("dynprune.guard.collect_masks", lambda m: masks)
            return _val_epoch_hooks(guard, trainer, SimpleNamespace(model=nn.Identity(), hparams={
                "lam": 0.5, "target": None, "num_classes": 10}))
    _val_epoch_hooks(guard, trainer, SimpleNamespace(model=model, hparams={"lam": 0.5, "target": None,
                                                                           "num_classes": 10}))


def _val_epoch_hooks(guard: CollapseGuard, trainer: Any, module: Any) -> None:
    guard.on_validation_epoch_start(trainer, module)
    guard.on_validation_batch_end(trainer, module, None, None, 0)
    guard.on_validation_epoch_end(trainer, module)
    guard.on_validation_end(trainer, module)


def test_guard_counts_consecutive_collapsed_epochs_per_layer() -> None:
    guard = CollapseGuard(patience=2, network="ignore")
    _val_epoch(guard, {"a": [0.0, 0.0], "b": [1.0, 1.0]}, 0)
    _val_epoch(guard, {"a": [0.0, 0.5], "b": [1.0, 1.0]}, 1)  # 'a' came back: its streak restarts
    _val_epoch(guard, {"a": [0.0, 0.0], "b": [1.0, 1.0]}, 2)  # 'b' all on: not a failure by default
    with pytest.raises(GuardError, match=r"layer 'a' collapsed at epoch 3: every gate is off.*lower lam or "
                       r"raise target \(now lam=0.5, target=None\)"):
        _val_epoch(guard, {"a": [0.0, 0.0], "b": [1.0, 1.0]}, 3)
    on = CollapseGuard(patience=1, fail_on="on")
    with pytest.raises(GuardError, match=r"layer 'b' .* every gate is on.*raise lam or lower target"):
        _val_epoch(on, {"a": [0.0, 0.0], "b": [1.0, 1.0]}, 0)
    none = CollapseGuard(patience=1, fail_on="none", network="ignore")
    _val_epoch(none, {"a": [0.0, 0.0]}, 0, acc=0.1)
    warming_up = CollapseGuard(patience=1)  # gates switched off (GatedClassifier's dense_epochs): nothing to judge
    _val_epoch(warming_up, {"a": [0.0, 0.0]}, 0, gates_on=False)
    assert warming_up.streaks == {}
    with pytest.raises(ValueError, match="unknown fail_on 'of'; choose one of: off, on, both, none"):
        CollapseGuard(fail_on="of")
    with pytest.raises(ValueError, match="unknown network 'halt'; choose one of: stop, warn, ignore"):
        CollapseGuard(network="halt")


def test_dead_network_with_every_residual_gate_closed_is_caught() -> None:
    """ResNet-20 with every gate closed: each gated conv only skips its residual branch (no dead layer), but
    all of them at once at chance accuracy is a dead network."""
    model = dp.gate_model(dp.backbones.create("resnet20", input_size=8, width_mult=0.5), "sigmoid",
                          init_bias=-20.0).eval()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))
    sites = list(dp.collect_masks(model))
    assert skippable_sites(model, sites) == set(sites) and all(m.sum() == 0 for m in dp.collect_masks(model).values())
    _val_epoch(CollapseGuard(patience=1), {}, 0, acc=0.5, model=model)  # a tiny network that still classifies
    guard = CollapseGuard(patience=2)
    _val_epoch(guard, {}, 0, acc=0.12, model=model)
    with pytest.raises(GuardError, match=rf"training stopped: every gate of all {len(sites)} gated sites \(residual "
                       r"and block gates included\) is closed for every validation input and val/acc=0.1200 is at "
                       r"chance \(1/10 = 0.1000, margin 0.05\) at epoch 1 \(2 consecutive"):
        _val_epoch(guard, {}, 1, acc=0.12, model=model)
    with pytest.warns(UserWarning, match="every gate of all .* is closed"):
        _val_epoch(CollapseGuard(patience=1, network="warn"), {}, 0, acc=0.12, model=model)


def test_dead_network_stops_training_before_its_checkpoint(tmp_path: Path) -> None:
    module = dp.GatedClassifier("vgg11", gate="sigmoid", input_size=8, width_mult=0.125,
                                gate_kwargs={"init_bias": -20.0})
    trainer = _trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1),
                                  CollapseGuard(patience=1, fail_on="none")], max_epochs=2, limit_train_batches=1,
                       limit_val_batches=2)
    with pytest.raises(GuardError, match=r"training stopped: every gate .* at epoch 0"):
        trainer.fit(module, dp.DigitsDataModule())
    assert not list(tmp_path.glob("*.ckpt"))


def test_guard_stops_a_collapsed_run_before_checkpointing_it(tmp_path: Path) -> None:
    # a chain net (VGG) with every gate off from the start: the first gated conv cuts the network
    module = dp.GatedClassifier("vgg11", gate="sigmoid", input_size=8, width_mult=0.125,
                                gate_kwargs={"init_bias": -20.0})
    trainer = _trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1),
                                  CollapseGuard(patience=2)], max_epochs=4, limit_train_batches=1,
                       limit_val_batches=1)
    with pytest.raises(GuardError, match=r"layer 'features.4' collapsed at epoch 1: every gate is off"):
        trainer.fit(module, dp.DigitsDataModule())
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=1.ckpt", "last.ckpt"]


def test_guard_accepts_skipped_residual_blocks(tmp_path: Path) -> None:
    """A ResNet block's conv1 always off skips the block: legitimate, not a dead layer."""
    module = _module(gate_kwargs={"init_bias": -20.0})
    trainer = _trainer(tmp_path, [CollapseGuard(patience=1, network="ignore")], max_epochs=2, limit_train_batches=1,
                       limit_val_batches=1)
    trainer.fit(module, dp.DigitsDataModule())
    assert trainer.current_epoch == 2


class _NaNAtStep2(dp.GatedClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 2 else loss


def test_guard_stops_on_nan_loss_and_never_writes_a_nan_checkpoint(tmp_path: Path) -> None:
    module = _NaNAtStep2("resnet20", input_size=8, width_mult=0.5)
    trainer = _trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True),
                                  CollapseGuard()], max_epochs=1, limit_train_batches=5)
    with pytest.raises(GuardError, match="training loss is nan at epoch 0, step 2; training stopped before the "
                       "update.*Lower lr"):
        trainer.fit(module, dp.DigitsDataModule())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and all(torch.isfinite(v).all() for v in last["state_dict"].values()
                                            if v.is_floating_point())
    with torch.no_grad():
        module.model.fc.weight[0, 0] = float("inf")
    with pytest.raises(GuardError, match=r"refusing to write a checkpoint with non-finite values in "
                       r"\['model.fc.weight'\]"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


# -- input validation ------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gate": "sigmod"}, "unknown gate 'sigmod'; choose one of: " + ", ".join(dp.list_gates())),
    ({"backbone": "resnet21"}, "unknown backbone 'resnet21'; choose one of: " + ", ".join(dp.list_backbones())),
    ({"lam": -0.1}, r"lam must be >= 0, got -0.1"),
    ({"target": 0.0}, r"target \(FLOPs ratio\) must be in \(0, 1\], got 0.0"),
    ({"target": 1.5}, r"target \(FLOPs ratio\) must be in \(0, 1\], got 1.5"),
])
def test_bad_module_arguments_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dp.GatedClassifier(**{"backbone": "lenet5", **kwargs})


def test_model_without_eligible_layers_is_an_error() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match=r"nothing to gate at granularity 'channel'"):
        dp.gate_model(model, "sigmoid", input_shape=(1, 8, 8))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"in_chans": 3}, r"the data has in_chans=1 but the model expects in_chans=3 \(input shape \(3, 8, 8\)\)"),
    ({"input_size": 16}, r"the data has input_size=8 but the model expects input_size=16"),
])
def test_data_model_shape_mismatch_is_named(kwargs: dict[str, Any], message: str) -> None:
    module = dp.GatedClassifier("resnet20", **{"input_size": 8, "width_mult": 0.5, **kwargs})
    with pytest.raises(ValueError, match=message):
        L.Trainer(max_steps=1, **quiet_trainer_kwargs()).fit(module, dp.DigitsDataModule())


def test_missing_data_files_name_the_path_and_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/train-images-idx3-ubyte.gz.*"
                       r"apt-get install dataset-fashion-mnist"):
        dp.FashionMNISTDataModule(data_dir=str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match=rf"CIFAR-10 batch {tmp_path}/data_batch_1 not found"):
        dp.CIFAR10DataModule(data_dir=str(tmp_path)).setup("fit")


# -- atomic outputs --------------------------------------------------------------------------------

def test_flops_json_survives_a_crash_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module, dm = _module(), dp.DigitsDataModule()
    trainer = _trainer(tmp_path, [dp.FlopsCallback(dirpath=str(tmp_path), plot=False)], limit_val_batches=1)
    trainer.validate(module, dm, verbose=False)
    before = (tmp_path / "flops.json").read_text()
    assert json.loads(before)["val"]["inputs"] == 64

    def crash(data: Any, f: Any, **kwargs: Any) -> None:
        f.write('{"val": {"inputs": ')
        raise OSError("disk full")

    monkeypatch.setattr("dynprune.io.json.dump", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.validate(module, dm, verbose=False)
    assert (tmp_path / "flops.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flops.json", "flops_layers.csv"]  # no temp file left


@pytest.mark.parametrize("foreign", ["garbage", "symlink"])
def test_a_foreign_flops_json_never_loses_the_report(tmp_path: Path, foreign: str) -> None:
    """flops.json is written fresh from the callback's own reports: a non-JSON file, or a symlink to another
    program's JSON, is replaced (the symlink's target untouched) and never read."""
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere.json"
    out.mkdir()
    elsewhere.write_text('{"val": {"inputs": -1}, "theirs": 1}')
    if foreign == "garbage":
        (out / "flops.json").write_text("not json {")
    else:
        (out / "flops.json").symlink_to(elsewhere)
    module, dm = _module(), dp.DigitsDataModule()
    trainer = _trainer(out, [dp.FlopsCallback(dirpath=str(out), plot=False, verbose=False)], limit_val_batches=1,
                       limit_test_batches=1)
    trainer.validate(module, dm, verbose=False)
    trainer.test(module, dm, verbose=False)
    saved = json.loads((out / "flops.json").read_text())
    assert set(saved) == {"val", "test"} and saved["val"]["inputs"] == saved["test"]["inputs"] == 64
    assert not (out / "flops.json").is_symlink()
    assert elsewhere.read_text() == '{"val": {"inputs": -1}, "theirs": 1}'


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_outputs_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        path = write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode and json.loads(path.read_text()) == {"a": 1}
