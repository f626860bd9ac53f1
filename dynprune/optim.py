"""The one optimiser and schedule every LightningModule of the project uses, so methods compare fairly."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from dynprune.checks import check_number

OPTIMIZERS = ("sgd", "adam")


def check_optimizer_args(optimizer: str, lr: float, momentum: float, weight_decay: float) -> None:
    """The optimiser's name and numbers, checked when a task is built (not when training starts)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")
    check_number("lr", lr, 0, low_open=True)
    check_number("momentum", momentum, 0, 1, low_open=optimizer == "sgd", high_open=True)  # nesterov needs > 0
    check_number("weight_decay", weight_decay, 0)


def optimizer_and_schedule(groups: Iterable[dict[str, Any]], optimizer: str, lr: float, momentum: float,
                           max_epochs: int | None, restart_at: int = 0) -> dict[str, Any]:
    """SGD (nesterov) or Adam over parameter ``groups`` (each with its own weight decay / lr), with a
    per-epoch cosine decay over ``max_epochs`` (none when it is unknown); Lightning's return format.
    ``restart_at`` > 0: one cosine over the first ``restart_at`` epochs, a second over the rest (a warm start
    inside one run gets the schedule that a separate dense run and fine-tune would have)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")
    groups = list(groups)
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    else:
        opt = torch.optim.Adam(groups, lr=lr)
    if not max_epochs or max_epochs < 1:
        return {"optimizer": opt}
    if not 0 < restart_at < max_epochs:
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs)}

    def factor(epoch: int) -> float:
        start, length = (0, restart_at) if epoch < restart_at else (restart_at, max_epochs - restart_at)
        return 0.5 * (1 + math.cos(math.pi * (epoch - start) / length))

    return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor)}
