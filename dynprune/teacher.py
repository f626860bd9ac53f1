"""Warm start and teacher: a checkpoint's weights loaded into the student (``init_from``), and the frozen
model the student distils from (``teacher``), which is not the student's submodule and never trains."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from dynprune.inject import GatingInfo
from dynprune.io import read_checkpoint
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
