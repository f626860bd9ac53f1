"""``StaticPruning``: a Lightning callback that runs an iterative pruning schedule inside ``fit``, so a
static baseline is one YAML block (``trainer.callbacks``) next to the dynamic-gate configs."""

from __future__ import annotations

import lightning as L

from dynprune.static.prune import PRUNERS, global_sparsity, prune_model
from dynprune.static.schedule import sparsity_schedule


class StaticPruning(L.Callback):
    """Prune ``pl_module.model`` to the next target of ``sparsity_schedule(final, start, step)`` at the
    end of epoch ``start_epoch`` and every ``every_n_epochs`` after it; the epochs in between
    fine-tune. ``start == final`` is one-shot pruning. Logs ``prune/sparsity`` and ``prune/round``.

    Resuming a run from a checkpoint taken after the first round is not supported: the checkpoint holds
    ``weight_orig`` / ``weight_mask`` entries that a fresh model does not have.
    """

    def __init__(
        self, method: str = "l1_structured", final: float = 0.5, start: float = 0.1, step: float = 0.05,
        start_epoch: int = 0, every_n_epochs: int = 1,
    ) -> None:
        PRUNERS.get(method)  # fail at construction on an unknown method
        if start_epoch < 0 or every_n_epochs < 1:
            raise ValueError(f"need start_epoch >= 0 and every_n_epochs >= 1, got {start_epoch}, {every_n_epochs}")
        self.method, self.targets = method, sparsity_schedule(final, start, step)
        self.start_epoch, self.every_n_epochs = start_epoch, every_n_epochs
        self.rounds_done = 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply the next pruning round when this epoch is a pruning epoch."""
        epoch = trainer.current_epoch - self.start_epoch
        if epoch < 0 or epoch % self.every_n_epochs or self.rounds_done >= len(self.targets):
            return
        model = getattr(pl_module, "model", pl_module)
        prune_model(model, self.method, self.targets[self.rounds_done])
        self.rounds_done += 1
        pl_module.log_dict({"prune/sparsity": global_sparsity(model), "prune/round": float(self.rounds_done)})
