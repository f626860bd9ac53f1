"""The gated training objective: task loss + lam * penalty(cost), plus the optional terms that make
gates input-dependent (per-layer bounded budget, batch shaping, logit penalty) and each gate family's own term.

In target mode with ``target_dual`` > 0 the objective also holds a Lagrange multiplier ``mu`` >= 0 of the constraint
cost <= target, updated by projected dual ascent after every training step (mu = max(0, mu + target_dual *
clip(c / target - 1, -1, 1))): a run that stays over its FLOPs target under a fixed lam raises its price until it
reaches it, instead of lam being tuned per ratio. The penalty is mu * (c - target): its price per unit of cost is mu
whatever the target (a relative mu * (c / target - 1) prices a far target 1/target times higher and overshot it).
The step should be small: gates switched off too fast rarely come back (a saturated sigmoid passes no gradient), so
an overshoot below the target tends to stay.

With ``target_control`` in (0, 1] the decisions themselves are steered instead: after every optimizer step one
constant is added to every gate's score, ``target_control`` times the shift that would have put the step's batch on
the target (its mean FLOPs ratio with the gates' own; :func:`dynprune.budget.batch_shift`), so the run follows its
target both ways while it trains, whatever the spread of the scores.

The objective knows the Gate interface only (``training_loss(ctx)``, ``probs``, ``scores``, ``mask``), never a
concrete family; a family that needs the batch rolled out with hard gates asks ``GateContext.rollout``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dynprune.budget import batch_shift, control_step
from dynprune.checks import check_number
from dynprune.flops import FlopsProfile
from dynprune.gatemodes import hard_rollout
from dynprune.gates import Gate, GateContext, Rollout
from dynprune.inject import collect_masks, gates_of
from dynprune.losses import (
    batch_shaping_loss,
    budget_bounds,
    budget_loss,
    logit_penalty,
    target_penalty,
)
from dynprune.runtime.profile import LatencyTable, profile_latency

COSTS = ("flops", "count", "latency")
TARGET_LOSSES = ("abs", "squared")


@dataclass
class Objective:
    """Settings of the cost terms (see :class:`dynprune.GatedClassifier` for their meaning)."""

    lam: float = 0.5
    cost: str = "flops"
    target: float | None = None
    target_loss: str = "abs"
    budget: float = 0.0
    budget_width: float = 0.1
    budget_anneal: float = 1 / 3
    batch_shaping: float = 0.0
    batch_shaping_warmup: float = 1.0
    logit_penalty: float = 0.0
    logit_penalty_warmup: float = 1.0
    latency_table: str | None = None
    target_dual: float = 0.0
    target_control: float = 0.0
    table: LatencyTable | None = field(default=None, init=False, repr=False)
    mu: float = field(default=0.0, init=False)
    shift: float = field(default=0.0, init=False)
    pending: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_number("lam", self.lam, 0)
        if self.cost not in COSTS:
            raise ValueError(f"unknown cost '{self.cost}'; choose one of: {', '.join(COSTS)}")
        if self.target is not None:
            check_number("target (FLOPs ratio)", self.target, 0, 1, low_open=True)
        if self.target_loss not in TARGET_LOSSES:
            raise ValueError(f"unknown target_loss '{self.target_loss}'; choose one of: {', '.join(TARGET_LOSSES)}")
        for name in ("budget", "budget_width", "batch_shaping", "logit_penalty"):
            check_number(name, getattr(self, name), 0)
        for name in ("budget_anneal", "batch_shaping_warmup", "logit_penalty_warmup"):  # fractions of training
            check_number(name, getattr(self, name), 0, 1, low_open=True)
        if self.budget > 0 and self.target is None:
            raise ValueError("budget > 0 bounds each layer around the FLOPs target: set target too")
        check_number("target_dual", self.target_dual, 0)
        if self.target_dual > 0 and self.target is None:
            raise ValueError("target_dual > 0 is the step size of the multiplier of the constraint cost <= target: "
                             "set target too")
        check_number("target_control", self.target_control, 0, 1)
        if self.target_control > 0 and self.target is None:
            raise ValueError("target_control > 0 is the share of the gate-score shift onto the FLOPs target that "
                             "each step applies: set target too")
        if self.latency_table is not None and self.cost != "latency":
            raise ValueError(f"latency_table is read by cost: latency only, got cost '{self.cost}'")

    def bind(self, model: nn.Module) -> None:
        """With ``cost: latency``: load ``latency_table`` and check it was profiled for ``model``'s sites (before
        training, so a wrong table fails early); no-op for other costs."""
        if self.cost == "latency" and self.latency_table is not None:
            table = LatencyTable.load(self.latency_table)
            table.check(model)
            self.table = table

    def table_state(self) -> dict | None:
        """The latency table in use as plain data, for checkpoints (None: none), so a resumed run prices
        decisions as before instead of profiling again."""
        return self.table.to_dict() if self.table is not None else None

    def load_table_state(self, state: dict | None) -> None:
        """Use the table a checkpoint kept (:meth:`table_state`), if any."""
        if state is not None:
            self.table = LatencyTable.from_dict(state, "the checkpoint's latency_table")

    def profile(self, model: nn.Module) -> LatencyTable | None:
        """With ``cost: latency`` and no table file: profile ``model`` now, on this machine (fit start); returns the
        new table (None when nothing was profiled)."""
        if self.cost != "latency" or self.table is not None:
            return None
        self.table = profile_latency(model)
        return self.table

    def penalty(self, mean_cost: Tensor) -> Tensor:
        """lam * c, or lam * distance(c, target) + mu * (c - target) in target mode, for the batch-mean cost c."""
        if self.target is None:
            return self.lam * mean_cost
        return self.lam * target_penalty(mean_cost, self.target, self.target_loss) + self.mu * (mean_cost - self.target)

    def dual_step(self, mean_cost: Tensor) -> None:
        """Projected dual ascent after a training step: mu = max(0, mu + target_dual * clip(c / target - 1, -1, 1))
        (no-op without ``target_dual``): the price rises while the run is over its target and falls back, never
        below 0, under it; the clip bounds one step's change by ``target_dual``."""
        if self.target_dual > 0 and self.target is not None:
            error = min(max(float(mean_cost.detach()) / self.target - 1.0, -1.0), 1.0)
            self.mu = max(0.0, self.mu + self.target_dual * error)

    def control(self, model: nn.Module) -> None:
        """After an optimizer step (no-op without ``target_control`` or before the gates start): shift every gate's
        score by the controller's move for the last training batch."""
        if self.pending is not None:
            control_step(model, self.pending)
            self.shift += self.pending
            self.pending = None

    def dual_state(self) -> dict[str, float]:
        """The multiplier and the controller's total shift, for checkpoints (a resumed run continues from the same
        price; the shift itself is in the gates' weights)."""
        return {"mu": self.mu, "shift": self.shift}

    def load_dual_state(self, state: dict[str, float] | float | None) -> None:
        """Continue from a checkpoint's multiplier and shift (None: an older checkpoint without them; a float: one
        with the multiplier only)."""
        if isinstance(state, dict):
            self.mu, self.shift = float(state["mu"]), float(state["shift"])
        elif state is not None:
            self.mu = float(state)

    def price(self, mean_cost: Tensor) -> Tensor:
        """The price of cost: d penalty / d c at a batch-mean cost c (detached), what one unit of cost is worth
        right now, so a REINFORCE reward penalises exactly what the loss penalises."""
        c = mean_cost.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.penalty(c), c)
        return grad

    def costs(self, masks: dict[str, Tensor], profile: FlopsProfile, per_layer: dict[str, Tensor] | None = None,
              ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(cost per input (N,), FLOPs ratio per input (N,), {site: own cost (N,)}); ``per_layer``: the
        profile's per-layer FLOPs of these masks if the caller already has them."""
        per_layer = profile.per_layer(masks) if per_layer is None else per_layer
        ratio = profile.total(per_layer) / profile.dense_total
        if self.cost == "latency":
            if self.table is None:
                raise RuntimeError("cost: latency has no latency table yet: give latency_table, or fit (the table is "
                                   "profiled at fit start)")
            return self.table.cost(masks), ratio, self.table.site_costs(masks)
        if self.cost == "count":
            site = {n: m.mean(dim=1) / len(masks) for n, m in masks.items()}
            return sum(site.values()), ratio, site
        return ratio, ratio, profile.site_costs(per_layer)

    def site_ratios(self, masks: dict[str, Tensor], profile: FlopsProfile,
                    per_layer: dict[str, Tensor] | None = None) -> Tensor:
        """Each site's batch FLOPs ratio over the layers it decides for directly (S,)."""
        per_layer = profile.per_layer(masks) if per_layer is None else per_layer
        dense = {lay.name: lay.dense for lay in profile.layers}
        out = []
        for name in masks:
            layers = [lay for lay in profile.dependents[name] if dense[lay] > 0]
            out.append(sum(per_layer[lay].mean() for lay in layers) / max(sum(dense[lay] for lay in layers), 1))
        return torch.stack(out)

    def extra_terms(self, gates: dict[str, Gate], masks: dict[str, Tensor], profile: FlopsProfile,
                    progress: float, per_layer: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The per-layer budget, batch-shaping and logit-penalty terms (weighted), those that are switched on;
        batch shaping and the logit penalty decay linearly to 0 over their warm-up fraction of training."""
        terms = {}
        if self.budget > 0:
            lb, ub = budget_bounds(progress, self.target, self.budget_anneal, self.budget_width)
            terms["budget"] = self.budget * budget_loss(self.site_ratios(masks, profile, per_layer), lb, ub)
        per_gate = (("batch_shaping", self.batch_shaping, self.batch_shaping_warmup, "probs", batch_shaping_loss),
                    ("logit_penalty", self.logit_penalty, self.logit_penalty_warmup, "scores", logit_penalty))
        for name, weight, warmup, attr, loss in per_gate:  # each decays linearly to 0 at ``warmup``
            if weight > 0 and progress < warmup:
                values = [getattr(g, attr) for g in gates.values() if getattr(g, attr) is not None]
                terms[name] = weight * (1 - progress / warmup) * torch.stack([loss(v) for v in values]).mean()
        return terms

    def gated_terms(self, model: nn.Module, profile: FlopsProfile, x: Tensor, y: Tensor, task_loss: Tensor,
                    progress: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One training step's weighted terms ({name: scalar}: penalty, the switched-on extra terms, the families'
        term) and metrics (FLOPs ratio, kept fraction), from the decisions of the training forward pass of inputs
        x (N, ...) with labels y (N,) and per-input task loss (N,)."""
        masks, gates = collect_masks(model), gates_of(model)
        per_layer = profile.per_layer(masks)  # once per step: the cost and the budget both need it
        cost, ratio, site_costs = self.costs(masks, profile, per_layer)
        terms = {"penalty": self.penalty(cost.mean()), **self.extra_terms(gates, masks, profile, progress, per_layer)}
        rollout = hard_rollout(model, x, y, lambda m: self.costs(m, profile))
        family = self.family_terms(gates, task_loss, site_costs, cost.mean(), rollout, progress)
        if family is not None:
            terms["family"] = family
        self.dual_step(cost.mean())  # after every term: this step is priced at the multiplier it started with
        keep = torch.cat([m.detach().flatten() for m in masks.values()]).mean()
        metrics = {"flops_ratio": ratio.mean().detach(), "keep": keep}
        if self.target_dual > 0:
            metrics["target_mu"] = torch.tensor(self.mu)
        if self.target_control > 0 and self.target is not None:  # applied by control() after the optimizer step
            self.pending = self.target_control * batch_shift(gates, profile, self.target)
            metrics["target_shift"] = torch.tensor(self.shift)
        return terms, metrics

    def family_terms(self, gates: dict[str, Gate], task_loss: Tensor, site_costs: dict[str, Tensor],
                     mean_cost: Tensor, rollout: Callable[[], Rollout], progress: float) -> Tensor | None:
        """Sum of every gate family's own training term (None when no family has one)."""
        def price(cost: Tensor | None = None) -> Tensor:
            return self.price(mean_cost if cost is None else cost)

        total = None
        for name, gate in gates.items():
            ctx = GateContext(task_loss.detach(), site_costs[name].detach(), rollout, progress, name, price)
            term = gate.training_loss(ctx)
            if term is not None:
                total = term if total is None else total + term
        return total
