"""The evaluation steps every classifier LightningModule of the project shares (gated and slimmable)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy


class ClassifierSteps:
    """``validation_step``/``test_step``/``predict_step`` for a LightningModule with ``val_acc``/``test_acc``
    metrics and an ``_eval_step(batch, stage, acc)``; mix in before ``L.LightningModule``."""

    val_acc: MulticlassAccuracy
    test_acc: MulticlassAccuracy

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, acc: MulticlassAccuracy) -> dict[str, Any]:
        raise NotImplementedError

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class predictions (N,) (a slimmable model: at its current width)."""
        return self(batch[0]).argmax(dim=1)  # type: ignore[operator]
