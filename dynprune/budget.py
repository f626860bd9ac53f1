"""Meeting a FLOPs budget: while training, a controller that moves one constant added to every gate's score G(x) a
share of the way to where the last batch's scores would have met the target (:func:`batch_shift`,
:func:`control_step`); after training, that constant chosen by bisection on held-out (validation) inputs so that
their mean effective FLOPs ratio lands on the target (:func:`meet_budget`).

A gated net trained towards a target ends near it, not on it (the training masks see batch statistics, and a
penalty only prices the distance). A benchmark that compares methods at equal FLOPs needs it on the target, and
choosing the shift on validation data keeps the test set untouched. A model over its target is shifted down
(its least confident units go first); shifting a model under its target up is possible but usually hurts, since
it switches on units the training kept off (``down_only``). Every family decides at inference by
``1[G(x) >= t]`` with G's last layer ``fc2``, so the shift is added to ``fc2.bias``: it is part of the weights,
the compiled runtime and saved models see it, and decisions stay monotone in it (a larger shift keeps more).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynprune.flops import FlopsProfile
from dynprune.gates import Gate
from dynprune.inject import collect_masks, gates_of


@dataclass(frozen=True)
class BudgetShift:
    """The outcome of :func:`meet_budget`."""

    shift: float
    """The constant added to every gate's score (0: the trained gates already met the target)."""
    before: float
    """Mean FLOPs ratio of the inputs before the shift."""
    after: float
    """Mean FLOPs ratio of the inputs after it."""


@torch.no_grad()
def mean_flops_ratio(model: nn.Module, profile: FlopsProfile, inputs: list[Tensor]) -> float:
    """Mean effective FLOPs ratio (gates' own FLOPs included, as every report counts them) of ``inputs`` (a list
    of batches) with the gates deciding hard, in eval mode (the model's mode is restored)."""
    total, count, was_training = 0.0, 0, model.training
    model.eval()
    try:
        for x in inputs:
            model(x)
            masks = collect_masks(model)
            flops = profile.effective(masks) + profile.gates({n: m.float() for n, m in masks.items()})
            total, count = total + float(flops.sum()), count + len(flops)
    finally:
        model.train(was_training)
    return total / count / profile.dense_total


@torch.no_grad()
def _shift(model: nn.Module, delta: float) -> None:
    for gate in gates_of(model).values():
        gate.fc2.bias.add_(delta)


@torch.no_grad()
def batch_shift(gates: dict[str, Gate], profile: FlopsProfile, target: float, span: float = 30.0,
                steps: int = 24) -> float:
    """The constant that, added to every gate's scores of the last forward pass (``Gate.scores``, held fixed),
    puts that batch's mean FLOPs ratio (gates' own FLOPs included, decisions by each family's inference rule) on
    ``target``: ``steps`` of bisection over [-span, span]; an end of the range when even it misses the target (the
    controller then moves as far as it may in one step).

    The scores of a trained gate spread over tens of logits, so a FLOPs error says little about how far to move
    them; the batch's own scores say exactly that.
    """
    missing = [name for name, gate in gates.items() if gate.scores is None]
    if missing:
        raise ValueError(f"batch_shift needs every gate's scores of a forward pass; none yet at {missing}")
    scores = {name: gate.scores.detach() for name, gate in gates.items()}

    def ratio(delta: float) -> float:
        masks = {name: gates[name].hard_decisions(s + delta) for name, s in scores.items()}
        flops = profile.effective(masks) + profile.gates(masks)
        return float(flops.mean()) / profile.dense_total

    lo, hi = -span, span
    if ratio(lo) > target:
        return lo
    if ratio(hi) < target:
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) < target else (lo, mid)
    return (lo + hi) / 2


def control_step(model: nn.Module, shift: float) -> None:
    """Add ``shift`` to every gate's score (``fc2.bias``) of ``model``: the controller's move after an optimizer
    step (see :func:`batch_shift`)."""
    if not math.isfinite(shift):
        raise ValueError(f"control_step needs a finite shift, got {shift}")
    _shift(model, shift)


@torch.no_grad()
def meet_budget(model: nn.Module, profile: FlopsProfile, inputs: Iterable[Tensor], target: float,
                tolerance: float = 0.005, max_shift: float = 30.0, steps: int = 30,
                down_only: bool = False) -> BudgetShift:
    """Shift every gate's score of ``model`` (in place) so that the mean FLOPs ratio of ``inputs`` (batches of model
    inputs, e.g. the validation split) is within ``tolerance`` (relative) of ``target``, or the closest the
    decisions allow after ``steps`` bisection steps over [-max_shift, max_shift].

    ``down_only``: only ever remove compute (a model under its target is left as it is, shift 0): shifting up
    switches on units that the training kept off, whose weights it never trained with them on.

    Raises ValueError for a target outside (0, 1], no inputs, or a target the gates cannot reach (all
    units of every site off, or all on, still miss it): the shift cannot help there and would hide the miss.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a FLOPs ratio in (0, 1], got {target}")
    gates_of(model)  # a clear error for a model without gates
    batches = list(inputs)
    if not batches:
        raise ValueError("meet_budget needs at least one batch of inputs")
    before = mean_flops_ratio(model, profile, batches)
    if abs(before / target - 1) <= tolerance or (down_only and before < target):
        return BudgetShift(0.0, before, before)
    lo, hi, applied = -max_shift, 0.0 if down_only else max_shift, 0.0
    # the ends of the bracket: the sparsest decisions must not be over the target, the densest not under it (down
    # only: the model as it is, already measured over the target)
    for bound, misses in ((lo, lambda r: r > target * (1 + tolerance)),
                          *(() if down_only else ((hi, lambda r: r < target * (1 - tolerance)),))):
        _shift(model, bound - applied)
        applied = bound
        reach = mean_flops_ratio(model, profile, batches)
        if misses(reach):
            _shift(model, -applied)
            raise ValueError(f"no shift of the gate scores in [-{max_shift:g}, {max_shift:g}] reaches the FLOPs "
                             f"target {target:.5f}: the {'sparsest' if bound == lo else 'densest'} decisions give "
                             f"{reach:.5f}")
    best = (abs(before / target - 1), 0.0, before)
    for _ in range(steps):
        mid = (lo + hi) / 2
        _shift(model, mid - applied)
        applied = mid
        ratio = mean_flops_ratio(model, profile, batches)
        best = min(best, (abs(ratio / target - 1), mid, ratio))
        if abs(ratio / target - 1) <= tolerance:
            break
        lo, hi = (mid, hi) if ratio < target else (lo, mid)
    _, shift, after = best
    _shift(model, shift - applied)
    return BudgetShift(shift, before, after)
