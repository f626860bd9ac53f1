"""ClassificationTask: the LightningModule base of every classifier in the project (gated and slimmable), in the
manner of torchgeo's BaseTask: a model, accuracy metrics, the one optimiser and schedule, the evaluation steps,
mode ownership, and the checks that the model, its inputs, its classes and the data agree. A subclass overrides
only what differs (its training step, its eval step, its parameter groups)."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from dynprune.data import check_num_classes
from dynprune.optim import optimizer_and_schedule

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
         "enable_model_summary": False, "num_sanity_val_steps": 0}
"""Trainer settings of the library's own inner fits (static fine-tuning, benchmark runs): no logs, checkpoints or
progress output."""


class ClassificationTask(L.LightningModule):
    """Base task: ``self.model`` maps (N, *input_shape) to logits (N, num_classes); hparams hold ``optimizer``,
    ``lr``, ``momentum``, ``weight_decay`` and ``num_classes``."""

    model: nn.Module
    TRAINING_ARGS: ClassVar[frozenset[str]] = frozenset({"optimizer", "lr", "momentum", "weight_decay"})
    """Arguments that only change how the model trains, not what it computes (a checkpoint evaluated with other
    values is the same model)."""

    @classmethod
    def training_args(cls) -> frozenset[str]:
        """The names of this task's training-only arguments."""
        return cls.TRAINING_ARGS

    def configure_metrics(self, num_classes: int) -> None:
        """Top-1 accuracy of the training, validation and test steps."""
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc: nn.Module = MulticlassAccuracy(num_classes)
        self.test_acc: nn.Module = MulticlassAccuracy(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, *input_shape) -> logits (N, num_classes)."""
        return self.model(x)

    @torch.no_grad()
    def check_outputs(self, shape: tuple[int, ...], num_classes: int) -> None:
        """The model must map (N, *shape) to (N, num_classes)."""
        was_training = self.model.training
        try:
            out = self.model.eval()(torch.zeros(1, *shape, device=next(self.model.parameters()).device))
        except RuntimeError as err:
            dims = ", ".join(map(str, shape))
            raise ValueError(f"backbone does not accept inputs of shape (N, {dims}): {err}") from err
        finally:
            self.model.train(was_training)
        if out.shape != (1, num_classes):
            raise ValueError(f"num_classes={num_classes} but the backbone outputs shape {tuple(out.shape[1:])}")

    def check_data(self, datamodule: L.LightningDataModule | None, shape: tuple[int, ...]) -> None:
        """The datamodule's classes and ``in_chans``/``input_size`` (when it declares them) must match the model's
        (input ``shape`` (C, H, W) for images)."""
        if datamodule is not None:
            check_num_classes(datamodule, self.hparams.num_classes)
        if len(shape) != 3:
            return
        for attr, expected in (("in_chans", shape[0]), ("input_size", shape[1])):
            value = getattr(datamodule, attr, None)
            if value is not None and value != expected:
                raise ValueError(f"the data has {attr}={value} but the model expects {attr}={expected} "
                                 f"(input shape {shape}); set model.{attr}={value} or change the data")

    def on_fit_start(self) -> None:
        """Own the model's mode: train mode at the start of each fit (Lightning keeps submodule modes, and a model
        handed over in eval mode would otherwise train with frozen BatchNorm statistics)."""
        self.model.train()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the torch RNG state: stochastic gates and sampled widths draw from it, so a resumed run stays exact."""
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG state when resuming ``fit`` (not when only loading weights)."""
        if "torch_rng_state" in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(checkpoint["torch_rng_state"])

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: every trainable parameter, with the task's weight decay."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad],
                 "weight_decay": self.hparams.weight_decay}]

    def schedule_restart(self) -> int:
        """The epoch at which the cosine schedule restarts (0: one cosine over the whole run)."""
        return 0

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD (nesterov) or Adam over :meth:`param_groups`, with cosine decay over ``max_epochs``."""
        hp = self.hparams
        return optimizer_and_schedule(self.param_groups(), hp.optimizer, hp.lr, hp.momentum,
                                      self.trainer.max_epochs if self._trainer else None,
                                      restart_at=self.schedule_restart())

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, acc: nn.Module) -> dict[str, Any]:
        """Log ``<stage>/...`` metrics of one batch; return what the report callbacks read (per-input FLOPs, ...)."""
        raise NotImplementedError

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class predictions (N,)."""
        return self(batch[0]).argmax(dim=1)
