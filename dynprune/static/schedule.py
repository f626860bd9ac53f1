"""Iterative pruning: prune to p_0, fine-tune k epochs, raise by delta per round up to p_max.

One-shot pruning is the one-round schedule ``sparsity_schedule(p, start=p)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
from torch import nn

from dynprune.static.finetune import accuracy, finetune
from dynprune.static.prune import Amount, global_sparsity, prune_model


@dataclass(frozen=True)
class RoundResult:
    """What one prune -> fine-tune round reached (accuracies in [0, 1])."""

    round: int
    target: float
    sparsity: float
    acc_pruned: float
    acc_finetuned: float


def sparsity_schedule(final: Amount = 0.5, start: float = 0.1, step: float = 0.05) -> list[Amount]:
    """Targets ``start, start + step, ..., final`` (default 10% -> +5%/round -> 50%).

    With a per-layer mapping ``final``, the rounds follow the schedule of its largest fraction and
    each layer is scaled in proportion, so every layer reaches its own final fraction together.
    """
    top = max(final.values()) if isinstance(final, Mapping) else float(final)
    if not 0 < start <= top < 1 or step <= 0:
        raise ValueError(f"need 0 < start <= final < 1 and step > 0, got start={start}, final={top}, step={step}")
    rounds = math.ceil((top - start) / step - 1e-9) + 1
    fractions = [min(round(start + i * step, 10), top) for i in range(rounds)]
    if isinstance(final, Mapping):
        return [{name: round(v * f / top, 10) for name, v in final.items()} for f in fractions]
    return list(fractions)


def iterative_prune(
    model: nn.Module,
    method: str,
    targets: Sequence[Amount],
    datamodule: L.LightningDataModule,
    epochs: int = 1,
    lr: float = 0.01,
    log: Callable[[RoundResult], Any] | None = print,
    split: str = "val",
    **finetune_kwargs: Any,
) -> list[RoundResult]:
    """Prune ``model`` in place round by round to each of ``targets`` with ``method``, fine-tuning
    ``epochs`` after each (``finetune``: one Lightning fit per round); measures the ``split`` accuracy
    before and after fine-tuning and logs each round."""
    results = []
    for i, target in enumerate(targets):
        prune_model(model, method, target)
        acc_pruned = accuracy(model, datamodule, split)
        finetune(model, datamodule, epochs, lr, **finetune_kwargs)
        mean_target = sum(target.values()) / len(target) if isinstance(target, Mapping) else float(target)
        result = RoundResult(i, mean_target, global_sparsity(model), acc_pruned, accuracy(model, datamodule, split))
        results.append(result)
        if log is not None:
            log(result)
    return results
