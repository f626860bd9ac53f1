"""The experiment workflow: shipped configs, default logger / progress bar / saved config, and the local
sweep runner (grid, random, resume, bad YAML, unsafe names, one runner per folder, children ended with
the runner, keys checked before launch)."""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import WandbLogger

import dynprune as dp
from dynprune.cli import DynpruneCLI, cli_main
from dynprune.entry import main
from dynprune.sweep import SweepConfigError, load_sweep, run_sweep, sweep_lock

ROOT = Path(__file__).parent.parent
CONF = ROOT / "tests" / "conf"
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def _cli(args: list[str]) -> DynpruneCLI:
    """Parse and instantiate without running a subcommand."""
    return DynpruneCLI(dp.GatedClassifier, L.LightningDataModule, subclass_mode_data=True, run=False, args=args)


@pytest.mark.parametrize("backbone", dp.list_backbones())
def test_every_backbone_has_a_fmnist_config_or_is_one_flag_on_one(backbone: str, tmp_path: Path) -> None:
    """A backbone needs at most one YAML (variants such as vit_p2 are ``--model.backbone`` on their family's)."""
    configs = {p: yaml.safe_load(p.read_text()) for p in (ROOT / "configs").glob("fmnist_*.yaml")}
    own = [p for p, c in configs.items() if c["model"].get("backbone") == backbone]
    family = [p for p in configs if backbone.startswith(p.stem.removeprefix("fmnist_").split("_")[0])]
    config = (own or family or [None])[0]
    assert config is not None, f"no configs/fmnist_*.yaml for {backbone}"
    cli = _cli(["--config", str(config), f"--model.backbone={backbone}", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.model.hparams.backbone == backbone


@pytest.mark.parametrize("gate", dp.list_gates())
def test_every_gate_family_is_one_flag_on_a_shipped_config(gate: str, tmp_path: Path) -> None:
    """A gate family needs no YAML of its own: ``--model.gate`` swaps it into any config, and the model builds."""
    cli = _cli(["--config", str(ROOT / "configs" / "fmnist_resnet20_sigmoid.yaml"), f"--model.gate={gate}",
                f"--trainer.default_root_dir={tmp_path}"])
    assert {type(g) for g in dp.gates_of(cli.model.model).values()} == {dp.gates.GATES.get(gate)}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]


def test_cifar10_config_without_data_names_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*cifar-10-python\.tar\.gz"):
        cli_main(["fit", "--config", str(ROOT / "configs" / "cifar10_resnet20_sigmoid.yaml"),
                  f"--data.init_args.data_dir={tmp_path}", "--trainer.fast_dev_run=true",
                  f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_load_and_point_at_existing_configs(path: Path) -> None:
    sweep = load_sweep(path)
    command = sweep.command_for(sweep.points()[0], Path("runs/x"))
    config = command[command.index("--config") + 1]
    assert (ROOT / config).is_file()
    assert sweep.method in ("grid", "random") and sweep.metric


def test_default_logger_is_wandb_under_default_root_dir(tmp_path: Path) -> None:
    cli = _cli(["--data=dynprune.data.DigitsDataModule", f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.trainer.logger, WandbLogger)
    assert Path(cli.trainer.logger.save_dir) == tmp_path
    assert any(isinstance(cb, RichProgressBar) for cb in cli.trainer.callbacks)


def test_csv_logger_selectable_and_no_bar_when_disabled(tmp_path: Path) -> None:
    cli = _cli(["--config", str(CONF / "digits_sigmoid.yaml"), f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"])
    assert type(cli.trainer.logger).__name__ == "CSVLogger"
    assert not any(isinstance(cb, RichProgressBar) for cb in cli.trainer.callbacks)


def test_resolved_config_saved_next_to_checkpoints(tmp_path: Path) -> None:
    cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), "--model.lam=0.3", "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
              f"--trainer.default_root_dir={tmp_path}"])
    saved = yaml.safe_load((tmp_path / "checkpoints" / "config.yaml").read_text())
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert saved["model"]["init_args"]["lam"] == 0.3 and saved["trainer"]["default_root_dir"] == str(tmp_path)


def _in_process(command: list[str], run_dir: Path, env: dict[str, str]) -> int:
    """Stand-in for the subprocess: run the same `python -m dynprune ...` command in this process."""
    assert command[:4] == ["/usr/bin/env", sys.executable, "-m", "dynprune"]
    main(command[4:])
    return 0


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_grid_sweep_writes_two_runs_and_a_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("dynprune.sweep.run_logged", _in_process)
    summary = run_sweep(load_sweep(CONF / "sweep_digits.yaml"), tmp_path, echo=lambda s: None)
    rows = _rows(summary)
    assert [r["run"] for r in rows] == ["lam-0.1", "lam-0.9"]
    assert [float(r["lam"]) for r in rows] == [0.1, 0.9] and {r["gate"] for r in rows} == {"sigmoid"}
    for row in rows:
        assert row["status"] == "finished" and row["eval"] == "test"
        assert 0 <= float(row["acc"]) <= 1 and 0 < float(row["flops_mean_ratio"]) <= 1
        assert float(row["flops_mean_ratio"]) <= float(row["flops_p90_ratio"]) + 1e-9
        run_dir = Path(row["run_dir"])
        assert (run_dir / "flops.json").is_file() and (run_dir / "checkpoints" / "config.yaml").is_file()
        assert json.loads((run_dir / "metrics.json").read_text())["hparams"]["lam"] == float(row["lam"])


def test_sweep_resumes_after_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    calls: list[str] = []

    def crash_on_second(command: list[str], run_dir: Path, env: dict[str, str]) -> int:
        calls.append(run_dir.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _in_process(command, run_dir, env)

    monkeypatch.setattr("dynprune.sweep.run_logged", crash_on_second)
    sweep = load_sweep(CONF / "sweep_digits.yaml")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path, echo=lambda s: None)
    summary = tmp_path / "sweep_digits" / "summary.csv"
    assert [r["run"] for r in _rows(summary)] == ["lam-0.1"]
    calls.clear()
    monkeypatch.setattr("dynprune.sweep.run_logged", lambda c, d, e: calls.append(d.name) or _in_process(c, d, e))
    run_sweep(sweep, tmp_path, echo=lambda s: None)
    assert calls == ["lam-0.9"]
    assert [r["run"] for r in _rows(summary)] == ["lam-0.1", "lam-0.9"]


def test_failed_run_is_reported_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("dynprune.sweep.run_logged", lambda c, d, e: 3)
    sweep = load_sweep(CONF / "sweep_digits.yaml")
    sweep = type(sweep)(**{**sweep.__dict__, "run_cap": 1})
    with pytest.raises(RuntimeError, match="1 run\\(s\\) failed: lam-0.1"):
        run_sweep(sweep, tmp_path, echo=lambda s: None)
    row = _rows(tmp_path / "sweep_digits" / "summary.csv")[0]
    assert row["status"] == "failed" and row["returncode"] == "3"
    monkeypatch.setattr("dynprune.sweep.run_logged", _in_process)
    run_sweep(sweep, tmp_path, echo=lambda s: None)
    assert _rows(tmp_path / "sweep_digits" / "summary.csv")[0]["status"] == "finished"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


RANDOM = """
method: random
program: train.py
parameters:
  model.lam: {distribution: log_uniform_values, min: 0.01, max: 1.0}
  model.gate: {values: [sigmoid, l1]}
  trainer.max_epochs: {min: 1, max: 3}
  seed_everything: {value: 0}
"""


def test_random_points_are_seeded_in_range_and_extendable(tmp_path: Path) -> None:
    sweep = load_sweep(_write(tmp_path, RANDOM))
    points = sweep.points(count=20, seed=1)
    assert points[:5] == sweep.points(count=5, seed=1)
    assert all(0.01 <= p["model.lam"] <= 1.0 and p["trainer.max_epochs"] in (1, 2, 3) for p in points)
    assert {p["model.gate"] for p in points} == {"sigmoid", "l1"} and {p["seed_everything"] for p in points} == {0}
    ids = sweep.run_ids(points)
    assert len(set(ids)) == 20 and ids[0].startswith("lam-")
    with pytest.raises(SweepConfigError, match="--count"):
        sweep.points()


def test_command_macros_are_filled_like_the_wandb_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_ROOT", "/data")
    sweep = load_sweep(_write(tmp_path, """
method: grid
program: train.py
parameters:
  model.lam: {values: [0.5]}
  flag: {value: true}
command: ["${env}", "${interpreter}", "${program}", "--root=${envvar:DATA_ROOT}/x", "${args_no_boolean_flags}"]
"""))
    command = sweep.command_for(sweep.points()[0], tmp_path / "run")
    assert command[1:5] == [sys.executable, "train.py", "--root=/data/x", "--model.lam=0.5"]
    assert command[5] == "--flag" and f"--trainer.default_root_dir={tmp_path / 'run'}" in command


@pytest.mark.parametrize(("text", "message"), [
    ("method: grid\nparamters: {}\n", "unknown sweep key 'paramters'"),
    ("method: bayes\nparameters: {a: {values: [1]}}\n", "wandb sweep .*wandb agent"),
    ("method: hyperband\nparameters: {a: {values: [1]}}\n", "method must be one of: grid, random, bayes"),
    ("method: grid\nparameters: {model.lam: {min: 0.1, max: 1.0}}\n", "grid cannot enumerate parameters.model.lam"),
    ("method: grid\nparameters: {model.lam: {vals: [1]}}\n", "unknown key 'vals' in parameters.model.lam"),
    ("method: random\nparameters: {a: {distribution: beta, min: 0, max: 1}}\n", "unknown distribution 'beta'"),
    ("method: grid\nparameters: {a: {values: [1]}}\ncommand: [python, \"${prog}\", \"${args}\"]\n",
     "unknown macro \\${prog}"),
    ("method: grid\nparameters: {a: {values: [1]}}\ncommand: [python, x.py]\n", "must pass the parameters"),
    ("method: grid\nparameters: {a: {values: [1]}}\nmetric: {name: acc, goal: max}\n", "metric.goal"),
    ("method: grid\nmethod: hyperband\nparameters: {a: {values: [1]}}\n",
     r"line 3, column 1: duplicate key 'method' \(first given on line 2\)"),
    ("method: grid\nparameters: {a: {values: [1]}, a: {values: [2]}}\n",
     r"duplicate key 'a' \(first given on line 3\)"),
])
def test_bad_sweep_yaml_exits_nonzero_naming_the_key(tmp_path: Path, text: str, message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "program: train.py\n" + text)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(path), "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow
def test_sweep_subprocesses_from_the_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: `dynprune sweep` runs real subprocesses; a second call skips both finished runs."""
    monkeypatch.chdir(ROOT)
    main(["sweep", str(CONF / "sweep_digits.yaml"), "--root", str(tmp_path)])
    rows = _rows(tmp_path / "sweep_digits" / "summary.csv")
    assert [float(r["lam"]) for r in rows] == [0.1, 0.9] and all(r["status"] == "finished" for r in rows)
    log = (tmp_path / "sweep_digits" / "lam-0.1" / "run.log").read_text()
    assert "--model.lam=0.1" in log.splitlines()[0]
    monkeypatch.setattr("dynprune.sweep.run_logged", lambda *a: pytest.fail("finished runs must be skipped"))
    main(["sweep", str(CONF / "sweep_digits.yaml"), "--root", str(tmp_path)])


# -- the runner stays in its folder and owns its children ----------------------------------------

@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", "..", ".hidden"])
def test_unsafe_sweep_names_are_refused_and_nothing_is_written(tmp_path: Path, name: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, f"name: {json.dumps(name)}\nmethod: grid\nparameters: {{a: {{values: [1]}}}}\n"
                            "command: [python, x.py, \"${args}\"]\n")
    root = tmp_path / "deep" / "root"
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(path), "--root", str(root)])
    assert exit_info.value.code == 2 and f"sweep name {name!r} in {path} must be a plain folder name" in \
        capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sweep.yaml"]


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "method: grid\nparameters:\n  a: {values: [1, 2}\n")
    with pytest.raises(SystemExit):
        main(["sweep", str(path)])
    assert f"YAML error in {path}, line 3, column 20" in capsys.readouterr().err


def test_second_runner_on_a_sweep_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dynprune.sweep.run_logged", lambda *a: pytest.fail("nothing may run"))
    sweep = load_sweep(CONF / "sweep_digits.yaml")
    with sweep_lock(tmp_path / "sweep_digits"):  # a runner holding the folder
        with pytest.raises(RuntimeError, match=rf"sweep folder {tmp_path}/sweep_digits is in use by another "
                                               rf"runner \(pid {os.getpid()} on "):
            run_sweep(sweep, tmp_path, echo=lambda s: None)
    assert not (tmp_path / "sweep_digits" / "lam-0.1").exists()


def test_unknown_parameter_key_fails_before_any_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("dynprune.sweep.run_logged", lambda *a: pytest.fail("nothing may run"))
    text = (CONF / "sweep_digits.yaml").read_text().replace("trainer.limit_val_batches:", "model.lamda:")
    with pytest.raises(SweepConfigError, match=r"point lam-0.1 is rejected by the dynprune CLI, nothing "
                                               r"was launched:.*lamda"):
        run_sweep(load_sweep(_write(tmp_path, text)), tmp_path, echo=lambda s: None)


_CHILD = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {grandchild.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait(condition: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    """Poll ``condition`` (not a timing assertion: the limit only stops a broken test from hanging)."""
    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.1)


@pytest.mark.parametrize(("sig", "ends"), [(signal.SIGTERM, "group"), (signal.SIGKILL, "child")])
def test_killing_the_runner_ends_its_child(tmp_path: Path, sig: signal.Signals, ends: str) -> None:
    pids = tmp_path / "pids"
    path = _write(tmp_path, f"method: grid\nparameters: {{a: {{values: [1]}}}}\ncommand: [\"${{interpreter}}\", "
                            f"-c, {json.dumps(_CHILD)}, {json.dumps(str(pids))}, \"${{args}}\"]\n")
    # the runner: `dynprune sweep` in a forked process (this one has imported dynprune already)
    runner = multiprocessing.get_context("fork").Process(
        target=main, args=(["sweep", str(path), "--root", str(tmp_path)],), daemon=True)
    runner.start()
    try:
        _wait(pids.is_file, "the child never started")
        child, grandchild = map(int, pids.read_text().split())
        os.kill(runner.pid, sig)
        runner.join(60)
        _wait(lambda: not _alive(child), "the child outlived the runner")
        if ends == "group":
            _wait(lambda: not _alive(grandchild), "the child's process group outlived the runner")
    finally:
        runner.kill()
        for pid in map(int, pids.read_text().split()) if pids.is_file() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
