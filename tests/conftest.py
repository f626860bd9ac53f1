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
