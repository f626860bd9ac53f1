"""``StaticPruning``: a Lightning callback that runs an iterative pruning schedule inside ``fit``, so a
static baseline is one YAML block (``trainer.callbacks``) next to the dynamic-gate configs, and the FLOPs
it reports are those of the physically pruned model."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch import Tensor, nn

from dynprune.flops import count_flops
from dynprune.static.channel_removal import remove_channels
from dynprune.static.dependency import input_shape_of
from dynprune.static.prune import PRUNERS, global_sparsity, prune_model
from dynprune.static.schedule import sparsity_schedule


class StaticPruning(L.Callback):
    """Prune ``pl_module.model`` to the next target of ``sparsity_schedule(final, start, step)`` at the
    end of epoch ``start_epoch`` and every ``every_n_epochs`` after it; the epochs in between
    fine-tune. ``start == final`` is one-shot pruning. Logs ``prune/sparsity``, ``prune/round`` and
    ``prune/flops_ratio``; after each round it sets ``pl_module.static_flops`` to the FlopCounterMode count
    of the physically pruned model (``remove_channels``), which the module reports as its per-input FLOPs.

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
        self._batch: tuple[Tensor, Tensor] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object,
                           batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Keep the latest training batch: gradient criteria (``taylor``) score channels on it."""
        self._batch = (batch[0].detach(), batch[1].detach())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply the next pruning round when this epoch is a pruning epoch."""
        epoch = trainer.current_epoch - self.start_epoch
        if epoch < 0 or epoch % self.every_n_epochs or self.rounds_done >= len(self.targets):
            return
        model = getattr(pl_module, "model", pl_module)
        shape = _module_input_shape(pl_module, model)
        prune_model(model, self.method, self.targets[self.rounds_done], shape, self._batch)
        self.rounds_done += 1
        pl_module.static_flops = physical_flops(model, shape)
        pl_module.log_dict({"prune/sparsity": global_sparsity(model), "prune/round": float(self.rounds_done),
                            "prune/flops_ratio": pl_module.static_flops / count_flops(model, shape)[0]})


def physical_flops(model: nn.Module, input_shape: Sequence[int] | None = None) -> int:
    """FlopCounterMode FLOPs of one input through ``model`` with its all-zero channels removed."""
    shape = input_shape_of(model, input_shape)
    return count_flops(remove_channels(model, shape), shape)[0]


def _module_input_shape(pl_module: L.LightningModule, model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) of one input: the model's ``input_shape``, else the module's example input."""
    example = getattr(pl_module, "example_input_array", None)
    return input_shape_of(model, None if example is None or hasattr(model, "input_shape") else example.shape[1:])
