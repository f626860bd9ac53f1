"""The CLI driven like a user: tiny YAMLs in tests/conf/, fast_dev_run."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import dynprune as dp
from dynprune import cli
from dynprune.cli import PREEMPTED, DynpruneCLI, cli_main, main
from dynprune.slimmable import SlimmableClassifier

CONF = Path(__file__).parent / "conf"


@pytest.mark.parametrize("gate", dp.list_gates())
def test_fit_each_gate(gate: str, tmp_path: Path) -> None:
    cli = cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), f"--model.gate={gate}",
                    "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.model.hparams.gate == gate
    assert cli.trainer.state.finished


def test_fit_then_test_writes_flops_report(tmp_path: Path) -> None:
    cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), "--test_after_fit=true",
              "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", f"--flops.dirpath={tmp_path}",
              f"--trainer.default_root_dir={tmp_path}"])
    assert (tmp_path / "flops.json").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() or any(tmp_path.rglob("last.ckpt"))


def test_override_from_command_line(tmp_path: Path) -> None:
    cli = cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), "--model.lam", "0.123",
                    "--model.gate", "policy", "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.model.hparams.lam == 0.123 and cli.model.hparams.gate == "policy"


def test_print_config_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), "--model.lam=0.7", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["init_args"]["lam"] == 0.7 and config["data"]["class_path"].endswith("DigitsDataModule")
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    cli = cli_main(["fit", "--config", str(path), "--trainer.fast_dev_run=true",
                    f"--trainer.default_root_dir={tmp_path}"])
    assert cli.model.hparams.lam == 0.7


def test_bad_key_exits_nonzero_naming_the_key() -> None:
    proc = subprocess.run([sys.executable, "-m", "dynprune", "fit", "--config", str(CONF / "digits_sigmoid.yaml"),
                           "--model.lamda=0.1"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "lamda" in proc.stderr


def test_unknown_gate_in_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown gate 'sigmod'"):
        cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), "--model.gate=sigmod",
                  "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])


# -- resume, checkpoint precedence, weights required ----------------------------------------------

LOGGERS = {"csv": ["--trainer.logger=lightning.pytorch.loggers.CSVLogger"],
           "wandb": ["--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.project=p"]}


def _fit(root: Path, logger: str, *extra: str) -> DynpruneCLI:
    return cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), *LOGGERS[logger],
                     f"--trainer.logger.save_dir={root}", f"--trainer.default_root_dir={root}",
                     "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.max_epochs=2",
                     "--flops.plot=false", *extra])


@pytest.mark.parametrize("logger", list(LOGGERS))
def test_readme_resume_continues_the_interrupted_run(logger: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An uninterrupted 2-epoch run, then a run stopped after epoch 0 (max_steps: a cosine schedule over the
    same 2 epochs), then `--ckpt_path last`: it resumes the stopped run, in its folder, and ends equal."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    full = _fit(tmp_path, logger)
    _fit(tmp_path, logger, "--trainer.max_steps=2")
    resumed = _fit(tmp_path, logger, "--ckpt_path", "last")
    timer = next(cb for cb in resumed.trainer.callbacks if isinstance(cb, dp.EpochTimer))
    assert len(timer.times) == 1 and resumed.trainer.global_step == 4  # only epoch 1 ran
    expected = full.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())
    runs = [Path(cli.trainer.checkpoint_callback.dirpath).parent for cli in (full, resumed)]
    assert runs[0] != runs[1] and sorted(p.parent.parent for p in tmp_path.rglob("last.ckpt")) == sorted(runs)
    for run in runs:  # each run's reports in its own folder
        assert json.loads((run / "flops.json").read_text())["val"]["epoch"] == 1 and (run / "config.yaml").is_file()
    if logger == "csv":
        with open(runs[1] / "metrics.csv") as f:
            epochs = [row["epoch"] for row in csv.DictReader(f) if row["val/acc"]]
        assert epochs == ["0", "1"]  # the interrupted run's epoch-0 row is kept


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a 1-batch fit of tests/conf/digits_sigmoid.yaml (lam 0.5)."""
    root = tmp_path_factory.mktemp("ckpt")
    cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), "--trainer.limit_train_batches=1",
              "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={root}", "--flops.plot=false"])
    return root / "checkpoints" / "last.ckpt"


def _exit_message(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_resume_with_a_conflicting_value_is_an_error_unless_overridden(checkpoint: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(CONF / "digits_sigmoid.yaml"), f"--ckpt_path={checkpoint}",
            f"--trainer.default_root_dir={tmp_path}", "--model.lam=0.1", "--model.gate_lr=0.3"]
    err = _exit_message(args, capsys)
    assert "model.lam: config 0.1, checkpoint 0.5; model.gate_lr: config 0.3, checkpoint None" in err
    assert "--override_checkpoint_hparams true" in err
    cli = cli_main([*args, "--override_checkpoint_hparams=true"])  # resumes at max_epochs: nothing left to train
    assert cli.model.hparams.lam == 0.1 and cli.trainer.global_step == 1


def test_checkpoint_of_another_backbone_names_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lenet.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": "lenet5", "lam": 0.5}}, path)
    for command in ("fit", "test"):
        err = _exit_message([command, "--config", str(CONF / "digits_sigmoid.yaml"), f"--ckpt_path={path}"], capsys)
        assert f"checkpoint {path} holds a 'lenet5' model but the config's model.backbone is 'resnet20'" in err


def test_test_uses_the_checkpoints_training_only_values(checkpoint: Path, tmp_path: Path) -> None:
    cli = cli_main(["test", "--config", str(CONF / "digits_sigmoid.yaml"), f"--ckpt_path={checkpoint}",
                    "--model.lam=0.9", f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_test_batches=1",
                    "--flops.plot=false", "--flops.verbose=false"])
    assert cli.model.hparams.lam == 0.5 and "test/acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize("command", ["test", "validate", "predict"])
def test_evaluation_without_weights_is_refused(command: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_message([command, "--config", str(CONF / "digits_sigmoid.yaml"),
                         f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert f"`dynprune {command}` needs weights: pass --ckpt_path" in err and "--allow_untrained true" in err
    err = _exit_message([command, "--config", str(CONF / "digits_sigmoid.yaml"), "--ckpt_path=last",
                         f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert f"--ckpt_path last: no checkpoint matches {tmp_path}/checkpoints/last.ckpt" in err


def test_untrained_evaluation_when_asked(tmp_path: Path) -> None:
    cli = cli_main(["validate", "--config", str(CONF / "digits_sigmoid.yaml"), "--allow_untrained=true",
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=1", "--flops.plot=false"])
    assert "val/acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint_is_named_without_unsafe_advice(damage: str, checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.ckpt"
    data = checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else pickle.dumps(print))
    err = _exit_message(["test", "--config", str(CONF / "digits_sigmoid.yaml"), f"--ckpt_path={path}"], capsys)
    assert f"cannot read checkpoint {path}: it is truncated, corrupt or not a PyTorch checkpoint" in err
    assert "weights_only=False" not in err and "weights_only set to False" not in err


def test_num_classes_must_match_the_data(tmp_path: Path) -> None:
    for n in (5, 20):
        with pytest.raises(ValueError, match=f"the model has num_classes={n} but the data "
                                             r"\(DigitsDataModule\) has 10 classes"):
            cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), f"--model.num_classes={n}",
                      "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])


def test_fit_slimmable_config(tmp_path: Path) -> None:
    cli = cli_main(["fit", "--config", str(Path(__file__).parents[1] / "configs" / "fmnist_resnet20_slimmable.yaml"),
                    "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                    "--data.init_args.train_subset=256", "--data.init_args.test_subset=64",
                    "--data.init_args.batch_size=32", "--model.init_args.widths=[0.25, 1.0]"])
    assert isinstance(cli.model, SlimmableClassifier) and cli.model.widths == [0.25, 1.0]
    metrics = cli.trainer.callback_metrics
    assert {"test/acc_w0.25", "test/acc_w1", "test/flops_w0.25"} <= set(metrics)
    assert float(metrics["test/flops_w0.25"]) == cli.model.flops[0.25] < 0.1 * float(metrics["test/flops_w1"])


def test_flat_gated_config_still_works(tmp_path: Path) -> None:
    cli = cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), "--model.lam", "0.123",
                    "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    assert type(cli.model).__name__ == "GatedClassifier" and cli.model.hparams.lam == 0.123


# -- exit status and clear errors for bad input -----------------------------------------------------

class SigtermAtStep(L.Callback):
    """Sends this process SIGTERM after global step ``step``, as a preempting scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # Lightning's handler is set
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_mid_fit_exits_with_the_documented_resumable_status(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), "--trainer.max_epochs=4",
              "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
              f"--trainer.default_root_dir={tmp_path}", "--flops.plot=false",
              '--trainer.callbacks+={"class_path": "test_cli.SigtermAtStep", "init_args": {"step": 3}}'])
    assert exit_info.value.code == PREEMPTED == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert "143 (128 + SIGTERM" in cli.__doc__ and "--ckpt_path last" in cli.__doc__
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, 2)  # the last completed epoch


@pytest.mark.parametrize(("line", "edited", "error"), [
    ("  lam: 0.5", "  lam: 0.5\n  lam: 0.9",
     "duplicate key 'lam' (first given on line {n})\n  in \"{path}\", line {m}"),
    ("  max_epochs: 1", "  max_epochs: 1\n  max_epochs: 2", "duplicate key 'max_epochs' (first given on line {n})"),
    ("  backbone: resnet20", "  backbone: [resnet20", "\n  in \"{path}\", line {m}, column"),
], ids=["duplicate_key", "duplicate_trainer_key", "syntax_error"])
def test_config_yaml_errors_name_the_file_and_the_key(line: str, edited: str, error: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A key given twice (PyYAML keeps the last silently) and a syntax error: exit 2, naming the key and the file."""
    text = (CONF / "digits_sigmoid.yaml").read_text()
    n = text.splitlines().index(line) + 1
    path = tmp_path / "config.yaml"
    path.write_text(text.replace(line + "\n", edited + "\n"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert error.format(path=path, n=n, m=n + 1) in capsys.readouterr().err


def test_ckpt_path_of_a_directory_says_so(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = checkpoint.parent
    err = _exit_message(["test", "--config", str(CONF / "digits_sigmoid.yaml"), f"--ckpt_path={folder}"], capsys)
    assert f"checkpoint {folder} is a directory, not a checkpoint file; pass a .ckpt file in it: " in err
    assert str(checkpoint) in err and "not found" not in err
