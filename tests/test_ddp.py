"""`test` from a saved checkpoint, in one process and with DDP over 2 gloo processes on the CPU: the FLOPs
statistics that FlopsCallback gathers across ranks must equal the single-process ones on the same data.

DistributedSampler gives every rank ceil(N / world_size) inputs, padding with repeats of the first inputs
when N is not a multiple of the world size (all_gather also needs equal sizes per rank); those repeats would
be counted twice. The digits test split has N = 360 inputs, a multiple of 2, so both runs see exactly the
same 360 inputs (in a different order, which the statistics do not depend on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynprune.cli import cli_main

CONF = Path(__file__).parent / "conf" / "digits_sigmoid.yaml"
TEST_INPUTS = 360
SUMMARY = "--trainer.callbacks+=dynprune.sweep.RunSummary"


def _read(run_dir: Path) -> tuple[dict, dict]:
    """The test FLOPs report and the logged metrics of a run dir."""
    return (json.loads((run_dir / "flops.json").read_text())["test"],
            json.loads((run_dir / "metrics.json").read_text())["metrics"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fit a few batches (lam high enough that masks vary per input), test the final weights in the same run."""
    root = tmp_path_factory.mktemp("fit")
    cli_main(["fit", "--config", str(CONF), "--model.lam=2.0", "--model.gate_kwargs={init_bias: 0.5}",
              "--trainer.max_epochs=1", "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=1",
              "--test_after_fit=true", f"--trainer.default_root_dir={root}", f"--flops.dirpath={root}", SUMMARY])
    return root


def test_test_subcommand_from_saved_checkpoint(trained: Path, tmp_path: Path) -> None:
    cli_main(["test", "--config", str(CONF), "--model.gate_kwargs={init_bias: 0.5}",
              f"--ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", f"--trainer.default_root_dir={tmp_path}",
              f"--flops.dirpath={tmp_path}", SUMMARY])
    (fit_report, fit_metrics), (report, metrics) = _read(trained), _read(tmp_path)
    assert report["inputs"] == TEST_INPUTS
    assert report["summary"] == pytest.approx(fit_report["summary"])
    assert metrics["test/acc"] == pytest.approx(fit_metrics["test/acc"])
    assert report["summary"]["flops_min"] < report["summary"]["flops_max"]  # masks depend on the input


@pytest.mark.slow
def test_ddp_two_cpu_processes_gather_flops_like_one_process(trained: Path, tmp_path: Path) -> None:
    assert TEST_INPUTS % 2 == 0  # no DistributedSampler padding, see the module docstring
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "dynprune", "test", "--config", str(CONF), "--model.gate_kwargs={init_bias: 0.5}",
         f"--ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", "--trainer.strategy=ddp", "--trainer.devices=2",
         "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}", f"--flops.dirpath={tmp_path}",
         SUMMARY], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (single, single_metrics), (ddp, ddp_metrics) = _read(trained), _read(tmp_path)
    assert ddp["inputs"] == single["inputs"] == TEST_INPUTS
    assert ddp["summary"] == pytest.approx(single["summary"], rel=1e-6)
    keep = {row["layer"]: row["keep"] for row in single["layers"] if row["gated"]}
    assert keep and {row["layer"]: row["keep"] for row in ddp["layers"] if row["gated"]} == pytest.approx(keep)
    # test/loss and test/flops_ratio are logged by the module without sync_dist: rank 0's half only
    for key in ("test/acc", "test/flops_mean_ratio", "test/flops_p90_ratio"):
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], rel=1e-5), key
