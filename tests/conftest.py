"""Shared test setup: wandb disabled, quiet Lightning, seeded."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
torch.set_num_threads(1)  # small models; also robust when the machine is shared


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def quiet_trainer_kwargs(**overrides: object) -> dict:
    """Trainer kwargs for fast, silent test runs."""
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1)
    kwargs.update(overrides)
    return kwargs


def digits_masks_after_fit(granularity: str, lam: float, steps: int = 60) -> list[dict[str, torch.Tensor]]:
    """Seeded: a sigmoid-gated ResNet-20 (8x8 digits, half width) trained ``steps`` steps at ``lam``; the
    decisions of each validation batch, in eval mode."""
    import lightning as L

    import dynprune as dp

    L.seed_everything(0)
    dm = dp.DigitsDataModule(batch_size=64)
    module = dp.GatedClassifier("resnet20", gate="sigmoid", granularity=granularity, lam=lam, input_size=8,
                                width_mult=0.5, lr=0.05, gate_kwargs={"init_bias": 1.0})
    L.Trainer(max_steps=steps, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, dm)
    dm.setup()
    module.eval()
    masks = []
    with torch.no_grad():
        for x, _ in dm.val_dataloader():
            module(x)
            masks.append(module.masks())
    return masks
