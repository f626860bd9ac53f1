"""Training and evaluation of a pruned or compressed ``nn.Module`` through the project's one Lightning loop.

``finetune`` wraps the model in ``GatedClassifier(model, gate=None)`` (the module every method trains
with: same optimiser, cosine schedule and steps), so the plain-Python pipelines (iterative pruning
rounds, Deep Compression's stages) fine-tune exactly like a dense, static or gated run of the CLI. Each
call is one ``fit`` with a fresh optimiser and schedule: a pruning round or a compression stage restarts
the cosine, as Han et al. retrain after each step. Masks (``torch.nn.utils.prune``) and
parametrizations (k-means weight sharing) stay on the model and are trained through.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from dynprune.module import GatedClassifier
from dynprune.task import QUIET

SPLITS = ("val", "test")


def _task(model: nn.Module, **module_kwargs: Any) -> L.LightningModule:
    """``GatedClassifier(model, gate=None)`` with the model's own input shape and number of classes."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError(f"{type(model).__name__} has no input_shape attribute; set model.input_shape = (C, H, W)")
    was_training = model.training
    with torch.no_grad():
        classes = model.eval()(torch.zeros(1, *shape, device=next(model.parameters()).device)).shape[1]
    model.train(was_training)
    return GatedClassifier(model, gate=None, num_classes=classes, **module_kwargs)


def finetune(
    model: nn.Module, datamodule: L.LightningDataModule, epochs: int, lr: float, *, optimizer: str = "sgd",
    weight_decay: float = 0.0, trainer: dict[str, Any] | None = None, **module_kwargs: Any,
) -> nn.Module:
    """Train ``model`` (in place) for ``epochs`` on ``datamodule``'s training split with cross-entropy:
    ``GatedClassifier(model, gate=None, lr=, optimizer=, weight_decay=, **module_kwargs)`` in one
    ``L.Trainer(max_epochs=epochs, **trainer)`` fit without validation. Returns ``model`` in eval mode."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if epochs:
        task = _task(model, lr=lr, optimizer=optimizer, weight_decay=weight_decay, **module_kwargs)
        L.Trainer(**{**QUIET, "limit_val_batches": 0, "max_epochs": epochs, **(trainer or {})}).fit(task, datamodule)
    return model.eval()


def accuracy(model: nn.Module, datamodule: L.LightningDataModule, split: str = "test",
             trainer: dict[str, Any] | None = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) on ``datamodule``'s ``val`` or ``test`` split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    task = _task(model)
    runner = L.Trainer(**{**QUIET, **(trainer or {})})
    result = (runner.validate if split == "val" else runner.test)(task, datamodule=datamodule, verbose=False)
    model.eval()
    return float(result[0][f"{split}/acc"])
