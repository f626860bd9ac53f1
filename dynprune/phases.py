"""Training phases that a gate family asks for by name (``Gate.phases``) and the task runs without knowing the
family. A family whose training decisions differ in kind from inference's (soft masks) declares both:

- ``bn_recalibration``: before each validation (and at each training epoch's end when none ran after the last
  step), re-estimate every BatchNorm's statistics over that many training batches with hard decisions, so that
  evaluation, the checkpoint and a later ``test`` see the statistics of the network that inference runs;
- ``hard_finetune``: the final fraction of training decides as at inference (the rest of the network adapts to
  the thresholded masks; the gates keep learning through a straight-through gradient).

Each phase is configured by the task argument of its name; adding one = a subclass + ``@register_phase``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from dynprune.checks import check_number
from dynprune.gatemodes import hard_gates
from dynprune.inject import gates_of
from dynprune.registry import Registry

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from dynprune.module import GatedClassifier


class Phase:
    """A training phase: hooks the task calls at fixed points; its setting is the task argument ``name``."""

    name: ClassVar[str]

    def __init__(self, task: GatedClassifier) -> None:
        self.task = task

    @staticmethod
    def check(value: Any) -> None:
        """Raise a ValueError naming the setting if ``value`` is not a valid one."""

    @property
    def setting(self) -> Any:
        """The value of the task argument that configures this phase."""
        return self.task.hparams[self.name]

    def training_forward(self) -> AbstractContextManager[None]:
        """Context of the training step's forward pass."""
        return nullcontext()

    def on_validation_epoch_start(self) -> None:
        """Before a validation epoch."""

    def on_train_epoch_end(self) -> None:
        """At a training epoch's end, before checkpoints are written."""


PHASES: Registry[Phase] = Registry("training phase")


def register_phase(cls: type[Phase]) -> type[Phase]:
    """Class decorator: register a Phase subclass under its ``name``."""
    PHASES.register(cls.name)(cls)
    return cls


@register_phase
class HardFinetune(Phase):
    """The final ``hard_finetune`` fraction of the gated training decides hard (straight-through to the gates)."""

    name = "hard_finetune"

    @staticmethod
    def check(value: Any) -> None:
        check_number("hard_finetune (a fraction of training)", value, 0, 1, high_open=True)

    def training_forward(self) -> AbstractContextManager[None]:
        if self.setting > 0 and self.task.progress() >= 1 - self.setting:
            return hard_gates(self.task.model, "finetune")
        return nullcontext()


@register_phase
class BatchNormRecalibration(Phase):
    """BatchNorm statistics of the hard network before each validation, and at each epoch's end unless a
    validation already recalibrated after the last step (``limit_val_batches=0``)."""

    name = "bn_recalibration"

    @staticmethod
    def check(value: Any) -> None:
        check_number("bn_recalibration (batches)", value, 0, integer=True)

    def __init__(self, task: GatedClassifier) -> None:
        super().__init__(task)
        self.calibrated_at: int | None = None

    def _due(self) -> bool:
        return self.setting > 0 and self.task.trainer.state.fn == "fit" and not self.task.in_dense_phase()

    def _recalibrate(self) -> None:
        task = self.task
        recalibrate_norms(task.model, task.trainer.train_dataloader, self.setting, task.device)
        self.calibrated_at = task.global_step

    def on_validation_epoch_start(self) -> None:
        if self._due() and not self.task.trainer.sanity_checking:
            self._recalibrate()

    def on_train_epoch_end(self) -> None:
        if self._due() and self.calibrated_at != self.task.global_step:
            self._recalibrate()


class Phases:
    """The phases that the gates of a task's model declare, run together."""

    def __init__(self, task: GatedClassifier) -> None:
        names = sorted({p for g in gates_of(task.model).values() for p in g.phases}) if task.gated else []
        self.phases = [PHASES.get(n)(task) for n in names]

    @contextmanager
    def training_forward(self) -> Iterator[None]:
        """Every phase's context of the training forward pass."""
        with ExitStack() as stack:
            for phase in self.phases:
                stack.enter_context(phase.training_forward())
            yield

    def on_validation_epoch_start(self) -> None:
        for phase in self.phases:
            phase.on_validation_epoch_start()

    def on_train_epoch_end(self) -> None:
        for phase in self.phases:
            phase.on_train_epoch_end()


@torch.no_grad()
def recalibrate_norms(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], batches: int,
                      device: torch.device | str = "cpu") -> None:
    """Recompute every BatchNorm's running mean/var of ``model`` as the average over ``batches`` batches of
    ``loader``, with the network in train mode but its gates deciding hard."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    try:
        with hard_gates(model):
            for _, (x, _) in zip(range(batches), loader, strict=False):
                model(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
