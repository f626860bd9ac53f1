"""Warm start and teacher: a checkpoint's weights loaded into the student (``init_from``), the warm start inside
one run (``dense_epochs``, :class:`DenseWarmup`), and the frozen model the student distils from (``teacher``: a
checkpoint path, a module, or the student itself at the end of its dense epochs), which is not the student's
submodule and never trains (:class:`Distiller`)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from dynprune.checks import check_number
from dynprune.inject import GatingInfo
from dynprune.io import read_checkpoint
from dynprune.losses import distillation_loss
from dynprune.trace import GATE_ATTR

# Arguments of a checkpoint's task that are reset when it is rebuilt as a teacher: they say how it was trained,
# not what it computes (and a teacher of its own would be loaded recursively).
_TRAINING_ARGS = {"init_from": None, "teacher": None, "distill": 0.0, "dense_epochs": 0, "frozen": None}


def _model_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task's state_dict (keys ``model.*``) or a bare model's, as the model's state_dict."""
    if any(k.startswith("model.") for k in state):
        return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return state


def warm_start(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a dense (or gated) checkpoint's backbone weights into ``model``; only gate parameters may be missing."""
    missing, unexpected = model.load_state_dict(_model_state(read_checkpoint(path)["state_dict"]), strict=False)
    missing = [k for k in missing if GATE_ATTR not in k]
    if missing or unexpected:
        raise ValueError(f"init_from={path} does not match the backbone: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def freeze(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with frozen parameters and every gate inside switched off (a gated
    model runs as its dense backbone). A LightningModule gives its ``model``."""
    if isinstance(model, L.LightningModule) and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    for module in teacher.modules():
        info = getattr(module, "dynprune", None)
        if isinstance(info, GatingInfo):
            info.switch.enabled = False
    return teacher


def teacher_from_checkpoint(path: str | os.PathLike[str], task: Callable[..., Any]) -> nn.Module:
    """The frozen model of a dynprune checkpoint: ``task`` rebuilt from the checkpoint's hyperparameters (without
    its training arguments: warm start, teacher, distillation, dense epochs), with the checkpoint's weights."""
    ckpt = read_checkpoint(path)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if "backbone" not in hparams:
        raise ValueError(f"teacher={path}: the checkpoint's hyperparameters name no backbone (its model was built "
                         "from an nn.Module); pass the teacher as an nn.Module instead")
    hparams.update(_TRAINING_ARGS)
    try:
        model = task(**hparams).model
    except TypeError as err:
        raise ValueError(f"teacher={path} is not a checkpoint of {getattr(task, '__name__', task)}: {err}") from err
    try:
        model.load_state_dict(_model_state(ckpt["state_dict"]))
    except RuntimeError as err:
        raise ValueError(f"teacher={path}: its weights do not fit the model its hyperparameters describe: "
                         f"{str(err).splitlines()[0]}") from err
    return freeze(model)


@torch.no_grad()
def check_teacher(teacher: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
    """The teacher must map (N, *input_shape) to (N, num_classes) logits, as the student does."""
    try:
        out = teacher(torch.zeros(1, *input_shape, device=next(teacher.parameters()).device))
    except RuntimeError as err:
        raise ValueError(f"the teacher does not accept the student's inputs (N, {', '.join(map(str, input_shape))}): "
                         f"{err}") from err
    if out.shape != (1, num_classes):
        raise ValueError(f"the teacher outputs shape {tuple(out.shape[1:])}, the student {num_classes} classes")


class Distiller:
    """``weight`` * KL(teacher || student) at ``temperature``, from a frozen teacher that is a plain attribute (not a
    submodule: not in the student's state_dict, never trained); its weights travel in the checkpoint."""

    KEY = "dynprune_teacher"

    def __init__(self, weight: float, temperature: float, teacher: nn.Module | None = None) -> None:
        self.weight, self.temperature, self.teacher = weight, temperature, teacher

    @staticmethod
    def check(weight: float, temperature: float, has_teacher: bool) -> None:
        """Distillation's numbers, and a teacher (given, or made later by the run) whenever ``weight`` > 0."""
        check_number("distill", weight, 0)
        check_number("distill_temperature", temperature, 0, low_open=True)
        if weight > 0 and not has_teacher:
            raise ValueError("distill > 0 needs a teacher: set teacher to a checkpoint path or an nn.Module, or "
                             "dense_epochs to distil from the model as it is after its dense epochs")

    @classmethod
    def build(cls, weight: float, temperature: float, teacher: str | nn.Module | None, task: Callable[..., Any],
              input_shape: tuple[int, ...], num_classes: int) -> Distiller | None:
        """None when ``weight`` is 0; else a Distiller of the teacher (a checkpoint of ``task``, or a module) that
        must map the student's inputs (N, *input_shape) to its ``num_classes``, or of none yet (made at the end of
        the dense epochs)."""
        if weight == 0:
            return None
        if teacher is not None:
            teacher = teacher_from_checkpoint(teacher, task) if isinstance(teacher, str) else freeze(teacher)
            check_teacher(teacher, input_shape, num_classes)
        return cls(weight, temperature, teacher)

    def loss(self, student_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The weighted distillation term of logits (N, K) of the student on inputs x (N, ...)."""
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return self.weight * distillation_loss(student_logits, teacher_logits, self.temperature)

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Put the teacher's weights in ``checkpoint`` (a resumed run distils from them, whatever a path holds)."""
        if self.teacher is not None:
            checkpoint[self.KEY] = self.teacher.state_dict()

    def load(self, checkpoint: dict[str, Any], student: nn.Module) -> None:
        """Restore the teacher's weights from ``checkpoint``; a teacher the run made from the ``student`` (at the end
        of its dense epochs) is made again first."""
        if self.KEY in checkpoint:
            if self.teacher is None:
                self.teacher = freeze(student)
            self.teacher.load_state_dict(checkpoint[self.KEY])


class DenseWarmup:
    """The warm start inside one run (``dense_epochs``), mixed into a gated task before its base: the first
    ``dense_epochs`` epochs train with the gates switched off, then the gates start with a fresh cosine schedule and,
    when the task distils without a given teacher, the model as it is then as the frozen teacher."""

    model: nn.Module
    distiller: Distiller | None
    hparams: Any
    gated: bool

    def in_dense_phase(self) -> bool:
        """Whether this epoch of ``fit`` is one of the first ``dense_epochs`` (gates off)."""
        trainer = self._trainer  # type: ignore[attr-defined]
        return (self.hparams.dense_epochs > 0 and trainer is not None and trainer.state.fn == "fit"
                and self.current_epoch < self.hparams.dense_epochs)  # type: ignore[attr-defined]

    def progress(self) -> float:
        """Fraction of the gated training done, in [0, 1] (the ``dense_epochs`` do not count)."""
        trainer = self._trainer  # type: ignore[attr-defined]
        if trainer is None:
            return 0.0
        total = trainer.estimated_stepping_batches
        if not total or total == float("inf"):
            return 0.0
        done = self.global_step / total  # type: ignore[attr-defined]
        dense = self.hparams.dense_epochs / trainer.max_epochs if self.hparams.dense_epochs else 0.0
        return min(1.0, max(0.0, (done - dense) / (1 - dense)))

    def on_fit_start(self) -> None:
        """The dense epochs must leave a gated epoch."""
        super().on_fit_start()  # type: ignore[misc]
        max_epochs = self._trainer.max_epochs  # type: ignore[attr-defined]
        if self.hparams.dense_epochs >= (max_epochs or 0) > 0:
            raise ValueError(f"dense_epochs={self.hparams.dense_epochs} leaves no gated epoch in "
                             f"max_epochs={max_epochs}")

    def on_train_epoch_start(self) -> None:
        """Switch the gates off for the dense epochs; when the gated phase starts, freeze the teacher if none."""
        if not self.gated or not self.hparams.dense_epochs:
            return
        self.model.dynprune.switch.enabled = not self.in_dense_phase()
        if self.distiller is not None and self.distiller.teacher is None and not self.in_dense_phase():
            self.distiller.teacher = freeze(self.model)

    def on_fit_end(self) -> None:
        """Leave the gates on, whatever phase ``fit`` stopped in."""
        if self.gated:
            self.model.dynprune.switch.enabled = True

    def schedule_restart(self) -> int:
        """The cosine schedule restarts when the gates start."""
        return self.hparams.dense_epochs
