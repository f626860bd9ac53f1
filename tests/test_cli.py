"""The CLI driven like a user: tiny YAMLs in tests/conf/, fast_dev_run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dynprune as dp
from dynprune.cli import cli_main, main

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
    assert config["model"]["lam"] == 0.7 and config["data"]["class_path"].endswith("DigitsDataModule")
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
