"""Gate modes for the task: every gate deciding hard (or hard with a straight-through gradient), an extra forward
pass inside a training step that leaves no trace, and the hard rollout of a batch that a gate family may ask for
(``GateContext.rollout``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynprune.gates import Rollout
from dynprune.inject import collect_masks, gates_of


@contextmanager
def hard_gates(model: nn.Module, mode: str = "hard") -> Iterator[None]:
    """Every gate of ``model`` decides deterministically (BatchNorm keeps its own mode); ``mode="finetune"`` keeps
    a straight-through gradient to the gates."""
    gates = gates_of(model)
    modes = {n: g.mode for n, g in gates.items()}
    for g in gates.values():
        g.set_mode(mode)
    try:
        yield
    finally:
        for n, g in gates.items():
            g.set_mode(modes[n])


@contextmanager
def side_pass(model: nn.Module) -> Iterator[None]:
    """An extra forward pass inside a training step that leaves no trace: BatchNorm updates copies of its running
    statistics (the training graph holds the originals) and the gates keep their last decisions."""
    gates = gates_of(model)
    kept = {n: (g.mask, g.probs, g.scores, g.forced) for n, g in gates.items()}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [dict(m._buffers) for m in norms]
    for m in norms:
        m._buffers.update({k: v.clone() for k, v in m._buffers.items() if v is not None})
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved, strict=True):
            m._buffers.update(buffers)
        for n, g in gates.items():
            g.mask, g.probs, g.scores, g.forced = kept[n]


Costs = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor, dict[str, Tensor]]]


def hard_rollout(model: nn.Module, x: Tensor, y: Tensor, costs: Costs) -> Callable[[], Rollout]:
    """A lazy :class:`Rollout` of the batch (x (N, ...), labels y (N,)) with hard gates, run once on first call in a
    side pass; ``costs`` maps decisions to (cost (N,), FLOPs ratio (N,), {site: own cost (N,)})."""
    cache: list[Rollout] = []

    def rollout() -> Rollout:
        if not cache:
            with torch.no_grad(), side_pass(model), hard_gates(model):
                task = F.cross_entropy(model(x), y, reduction="none")
                cost, _, site = costs(collect_masks(model))
            cache.append(Rollout(task, site, cost))
        return cache[0]

    return rollout
