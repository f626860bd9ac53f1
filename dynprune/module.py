"""GatedClassifier: the task that trains a backbone and its gates jointly, and dense or statically pruned models
(``gate=None``), so every method in a comparison shares one loop, optimiser and schedule.

It knows the Gate and Granularity interfaces only: a family brings its training term (``Gate.training_loss``) and
phases (``Gate.phases``, :mod:`dynprune.phases`), a granularity its terms (``Granularity.training_terms``).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from dynprune import backbones
from dynprune.budget import BudgetShift, meet_budget
from dynprune.checks import check_number
from dynprune.flops import FlopsProfile
from dynprune.gatemodes import side_pass
from dynprune.gates import DEFAULT_GATE, list_gates
from dynprune.granularity import Granularity, resolve
from dynprune.granularity.terms import TrainingTerms
from dynprune.inject import collect_masks, gate_model, gating_info
from dynprune.objective import Objective
from dynprune.optim import check_optimizer_args
from dynprune.phases import PHASES, Phases
from dynprune.task import ClassificationTask
from dynprune.teacher import DenseWarmup, Distiller, warm_start
from dynprune.trace import GATE_ATTR, trace_layers

LARGE_SHIFT = 0.1  # target_calibrate warns when the validation FLOPs end more than this share over the target


class GatedClassifier(DenseWarmup, ClassificationTask):
    """Backbone + gates, trained with task loss + lam * cost (+ optional terms).

    Args:
        backbone: a registered backbone name, or an nn.Module (gated already or not).
        gate: a registered gate family (``dynprune.list_gates()``), or None for a dense/static model.
        granularity: a registered granularity, a list of them (e.g. block gates outside, channel gates inside), or
            {name: {option: value}} for a granularity's options (e.g. ``{"width": {"widths": [0.5, 1]}}``).
        lam: weight of the cost penalty (>= 0).
        cost: ``flops`` (effective-FLOPs ratio), ``count`` (mean kept fraction) or ``latency`` (predicted latency
            ratio from a table measured through the compiled runtime: :mod:`dynprune.runtime.profile`).
        latency_table: with ``cost: latency``, a table written by ``dynprune profile-latency`` for this model
            (None: profiled on this machine at fit start and saved as ``latency_table.json`` in the log dir).
        target: if set, penalise the distance of the batch-mean cost to ``target`` instead of the cost.
        target_loss: ``abs`` (|c - t|) or ``squared`` ((c - t)^2).
        target_dual: step size of projected dual ascent on a multiplier mu >= 0 of the constraint cost <= target
            (0: off): the penalty gains mu * (c - target) and mu = max(0, mu + target_dual * clip(c / target -
            1, -1, 1)) after every step, so a run whose fixed lam cannot reach its target raises the price until it
            does (mu is kept in checkpoints). Keep it small (e.g. 0.005): gates switched off too fast rarely revive.
        target_control: share in (0, 1] of the way to the target that the controller steers the decisions each
            step (0: off): after every optimizer step, that share of the shift that would have put the step's batch
            on ``target`` (its mean FLOPs ratio, gates' own FLOPs included) is added to every gate's score
            (:func:`dynprune.budget.batch_shift`). Reaches far targets (1/16, 1/32) that a penalty reaches late or
            never, and the network trains with the threshold that meets them.
        target_calibrate: at the end of fit, if the validation data's mean FLOPs ratio is over ``target``, subtract
            one constant from every gate's score, chosen by bisection on that data, so that it lands on the target
            (:func:`dynprune.budget.meet_budget` with ``down_only``; the test set is never used; a model under its
            target is left as it is). ``"both"``: a model under its target is shifted up onto it too (for gates whose
            units the network can take back without having trained with them, e.g. tokens: a kept token is what the
            dense model saw). The shift is in the weights from then on (save the model after fit: the checkpoints
            written during fit predate it); ``budget_shift`` records it.
        where: module-name patterns to gate (a list, or {granularity: list} with several granularities).
        gate_kwargs: e.g. ``{"reduction": 4, "init_bias": 3.0}``.
        init_from: a checkpoint of a run of the same backbone to warm-start from (weights only; not a teacher).
        teacher: the model to distil from when ``distill`` > 0: a dynprune checkpoint path or an nn.Module, of any
            architecture with the student's inputs and classes (frozen, not a submodule, gates off; its weights are
            saved in every checkpoint, so a resumed run distils from the same teacher; :mod:`dynprune.teacher`).
        dense_epochs: the warm start inside one run: the first ``dense_epochs`` epochs train the backbone with its
            gates switched off (no cost terms), then the gates start, with a fresh cosine learning-rate schedule
            and, if ``distill`` > 0 and no ``teacher`` is given, the model as it is then as the frozen teacher.
            Every schedule of the gated objective (budget annealing, the decays, training phases) counts the
            gated epochs only.
        gate_lr: learning rate of gate parameters (default: 0.5 with SGD, 10 x ``lr`` with Adam: fast enough that
            every family reaches a FLOPs target within a short run); gates get no weight decay.
        bn_recalibration, hard_finetune: settings of the training phases of those names, run for gate families
            that declare them (see :mod:`dynprune.phases`).
        budget: weight of the per-layer bounded budget: each site's FLOPs ratio kept within
            [target - budget_width, target + budget_width], the bounds annealed from [0, 1] over the first
            ``budget_anneal`` of training (DGNet/DynConv style).
        batch_shaping: weight of the batch-shaping loss (Bejnordi et al.: per gate, the batch's probabilities
            match a Beta(0.6, 0.4) prior), decayed linearly to 0 over the first ``batch_shaping_warmup`` of training.
        logit_penalty: weight of the mean squared gate score G(x), decayed linearly to 0 over the first
            ``logit_penalty_warmup`` of training: keeps gates near their decision boundary while the network
            learns which inputs need which units (saturated scores give every input the same mask).
        distill: weight of KL(teacher || student) (0: off).
        distill_temperature: softmax temperature of distillation.
        width_targets: weight of a granularity's training term of that name (``Granularity.term_weights``; see
            :mod:`dynprune.granularity.width`).
        frozen: module-name patterns kept in eval mode with frozen parameters during fit (default: none; every
            other part of the model is put in train mode at the start of each fit, whatever mode it arrived in).
    """

    TRAINING_ARGS: ClassVar[frozenset[str]] = ClassificationTask.TRAINING_ARGS | {
        "lam", "cost", "target", "target_loss", "gate_lr", "init_from", "teacher", "dense_epochs", "budget",
        "budget_width", "budget_anneal", "batch_shaping", "batch_shaping_warmup", "logit_penalty",
        "logit_penalty_warmup", "distill", "distill_temperature", "frozen", "latency_table", "target_dual",
        "target_control", "target_calibrate"}

    @classmethod
    def training_args(cls) -> frozenset[str]:
        """Training-only arguments: the task's own, every phase's setting and every granularity's term weights."""
        return cls.TRAINING_ARGS | set(PHASES.names()) | TrainingTerms.weights()

    def __init__(
        self,
        backbone: str | nn.Module = "resnet20",
        gate: str | None = DEFAULT_GATE,
        granularity: str | list[str] | dict[str, dict[str, Any] | None] = "channel",
        lam: float = 2.0,
        cost: str = "flops",
        target: float | None = None,
        target_loss: str = "abs",
        num_classes: int = 10,
        in_chans: int = 1,
        input_size: int = 28,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        where: list[str] | dict[str, list[str]] | None = None,
        gate_kwargs: dict[str, float] | None = None,
        init_from: str | None = None,
        teacher: str | nn.Module | None = None,
        dense_epochs: int = 0,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        gate_lr: float | None = None,
        bn_recalibration: int = 50,
        hard_finetune: float = 0.25,
        budget: float = 0.0,
        budget_width: float = 0.1,
        budget_anneal: float = 1 / 3,
        batch_shaping: float = 0.0,
        batch_shaping_warmup: float = 1.0,
        logit_penalty: float = 0.0,
        logit_penalty_warmup: float = 1.0,
        distill: float = 0.0,
        distill_temperature: float = 4.0,
        width_targets: float = 0.0,
        frozen: list[str] | None = None,
        latency_table: str | None = None,
        target_dual: float = 0.0,
        target_control: float = 0.0,
        target_calibrate: bool | Literal["both"] = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=[k for k, v in (("backbone", backbone), ("teacher", teacher))
                                          if isinstance(v, nn.Module)])
        self._check_args(gate, teacher)
        self.objective = Objective(lam, cost, target, target_loss, budget, budget_width, budget_anneal,
                                   batch_shaping, batch_shaping_warmup, logit_penalty, logit_penalty_warmup,
                                   latency_table, target_dual, target_control)
        if isinstance(backbone, str):
            check_number("width_mult", width_mult, 0, low_open=True)
            check_number("depth_mult", depth_mult, 0, low_open=True)
            backbone = backbones.create(backbone, num_classes, in_chans, input_size, width_mult, depth_mult)
        self.model = backbone
        if gate is not None and not self.gated:
            self._gate(gate, resolve(granularity), where, gate_kwargs or {})
        shape = self.model.dynprune.flops.input_shape if self.gated else tuple(
            getattr(self.model, "input_shape", (in_chans, input_size, input_size)))
        self.check_outputs(shape, num_classes)
        self.example_input_array = torch.zeros(2, *shape)  # model summary: sizes and FLOPs
        if self.gated:
            self.objective.bind(self.model)
        self.profile = self.model.dynprune.flops if self.gated else FlopsProfile.build(
            self.model, shape, trace_layers(self.model, torch.zeros(1, *shape)))
        self.static_flops: int | None = None  # set by dynprune.static.StaticPruning: physically pruned FLOPs
        self.budget_shift: BudgetShift | None = None  # set at the end of fit with target_calibrate
        self.phases = Phases(self)
        self.terms = TrainingTerms(self.model, self.hparams, side_pass)
        if init_from is not None:
            warm_start(self.model, init_from)
        self.distiller = Distiller.build(distill, distill_temperature, teacher, GatedClassifier, shape, num_classes)
        self.configure_metrics(num_classes)

    def _check_args(self, gate: str | None, teacher: str | nn.Module | None) -> None:
        """The arguments that the objective, the phases and the granularities do not check themselves."""
        hp = self.hparams
        if gate is not None and gate not in list_gates():
            raise ValueError(f"unknown gate '{gate}'; choose one of: {', '.join(list_gates())} (or null)")
        check_number("dense_epochs", hp.dense_epochs, 0, integer=True)
        if hp.dense_epochs > 0 and gate is None:
            raise ValueError(f"dense_epochs is a number of epochs (>= 0) before a gate starts, got {hp.dense_epochs} "
                             f"with gate={gate}")
        Distiller.check(hp.distill, hp.distill_temperature, teacher is not None or hp.dense_epochs > 0)
        if hp.target_calibrate not in (False, True, "both"):
            raise ValueError(f"target_calibrate is true, false or 'both', got {hp.target_calibrate!r}")
        if hp.target_calibrate and (gate is None or hp.target is None):
            raise ValueError(f"target_calibrate shifts the gates onto the FLOPs target: it needs a gate and a target, "
                             f"got gate={gate}, target={hp.target}")
        if hp.gate_lr is not None:
            check_number("gate_lr", hp.gate_lr, 0, low_open=True)
        check_optimizer_args(hp.optimizer, hp.lr, hp.momentum, hp.weight_decay)
        for name in PHASES.names():
            PHASES.get(name).check(hp[name])

    def _gate(self, gate: str, granularities: dict[str, Granularity], where: list[str] | dict[str, list[str]] | None,
              gate_kwargs: dict[str, float]) -> None:
        if isinstance(where, dict):
            unknown = set(where) - set(granularities)
            if unknown:
                raise ValueError(f"where has keys {sorted(unknown)} that are not among "
                                 f"granularity={list(granularities)}")
        elif where is not None and len(granularities) > 1:
            raise ValueError("with several granularities, give where as {granularity: [patterns]}")
        for g in granularities:
            patterns = where.get(g) if isinstance(where, dict) else where
            gate_model(self.model, gate, granularity=granularities[g], where=patterns, **gate_kwargs)

    @property
    def gated(self) -> bool:
        """Whether the model has gates."""
        return hasattr(self.model, "dynprune")

    def setup(self, stage: str) -> None:
        """Flush denormals (soft masks near 0 otherwise make CPU convolutions ~10x slower); check the data."""
        torch.set_flush_denormal(True)
        self.check_data(getattr(self._trainer, "datamodule", None), self.profile.input_shape)

    def on_fit_start(self) -> None:
        """Train mode for everything but the ``frozen`` parts; the teacher on the task's device."""
        super().on_fit_start()
        for pattern in self.hparams.frozen or []:
            matched = [m for n, m in self.model.named_modules() if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(f"frozen pattern '{pattern}' matches no module of the model")
            for module in matched:
                module.eval().requires_grad_(False)
        if self.distiller is not None and self.distiller.teacher is not None:
            self.distiller.teacher.to(self.device)
        table = self.objective.profile(self.model) if self.gated else None
        if table is not None and self.trainer.log_dir is not None:
            table.save(Path(self.trainer.log_dir) / "latency_table.json")

    def on_fit_end(self) -> None:
        """Gates on (the warm start's hook); with ``target_calibrate``, shift them onto the target on validation."""
        super().on_fit_end()
        if not self.hparams.target_calibrate:
            return
        dm = getattr(self.trainer, "datamodule", None)
        loaders = dm.val_dataloader() if dm is not None else self.trainer.val_dataloaders
        if not loaders:
            raise ValueError("target_calibrate chooses the gates' shift on validation data: give fit a validation "
                             "loader (or a datamodule with val_dataloader)")
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        inputs = [batch[0].to(self.device) for loader in loaders for batch in loader]
        self.budget_shift = meet_budget(self.model, self.profile, inputs, self.hparams.target,
                                        down_only=self.hparams.target_calibrate != "both")
        shift = self.budget_shift
        message = (f"target_calibrate: gate scores shifted by {shift.shift:+.4f}, validation FLOPs "
                   f"{shift.before:.4f} -> {shift.after:.4f} of dense (target {self.hparams.target:.4f})")
        if shift.before > self.hparams.target * (1 + LARGE_SHIFT):
            rank_zero_warn(f"{message}: a shift this large also switches off units the network relies on (in the "
                           "benchmark, two ResNet-20 runs 17% and 34% over 1/16 lost 40-50 points of accuracy to it); "
                           "train nearer the target instead (target_control, or a larger target_dual or lam)")
        else:
            rank_zero_info(message)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the optimizer step: the ``target_control`` shift of the gate scores (no-op without it)."""
        self.objective.control(self.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The RNG state (the base task's), the teacher's weights and a ``cost: latency`` table."""
        super().on_save_checkpoint(checkpoint)
        if self.distiller is not None:
            self.distiller.save(checkpoint)
        checkpoint["latency_table"] = self.objective.table_state()
        checkpoint["target_state"] = self.objective.dual_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The RNG state when resuming (the base task's), the teacher's weights and a ``cost: latency`` table."""
        super().on_load_checkpoint(checkpoint)
        if self.distiller is not None:
            self.distiller.load(checkpoint, self.model)
        self.objective.load_table_state(checkpoint.get("latency_table"))
        self.objective.load_dual_state(checkpoint.get("target_state", checkpoint.get("target_mu")))  # older: mu only

    def masks(self) -> dict[str, Tensor]:
        """Decisions of the last forward pass per site ({} for a dense model or while the gates are off)."""
        return collect_masks(self.model) if self.gated and self.model.dynprune.switch.enabled else {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """task loss + lam * penalty (+ optional terms, + the gate families' and granularities' own terms)."""
        x, y = batch
        with self.phases.training_forward():
            logits = self(x)
        task = F.cross_entropy(logits, y, reduction="none")
        loss = task.mean()
        self.train_acc(logits, y)
        metrics: dict[str, Any] = {"train/task_loss": loss.detach(), "train/acc": self.train_acc}
        if self.distiller is not None and self.distiller.teacher is not None:
            kd = self.distiller.loss(logits, x)
            loss = loss + kd
            metrics["train/distill"] = kd.detach()
        if self.gated and not self.in_dense_phase():
            terms, gated_metrics = self.objective.gated_terms(self.model, self.profile, x, y, task, self.progress())
            terms.update(self.terms(x, y))
            loss = loss + sum(terms.values())
            metrics.update({f"train/{k}": v.detach() for k, v in {**terms, **gated_metrics}.items()})
        metrics["train/loss"] = loss.detach()
        self.log_dict(metrics, prog_bar=False, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, acc: nn.Module) -> dict[str, Any]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc(logits, y)
        masks = self.masks()
        per_layer = self.profile.per_layer(masks) if masks else {}
        flops = self.profile.total(per_layer) if masks else torch.full(
            (len(x),), float(self.static_flops or self.profile.dense_total), device=x.device)
        self.log_dict({f"{stage}/loss": loss, f"{stage}/acc": acc,
                       f"{stage}/flops_ratio": flops.mean() / self.profile.dense_total},
                      prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        if masks:  # e.g. nested width units: only those that take effect
            sites = gating_info(self.model).sites
            masks = {n: sites[n].effective(m) for n, m in masks.items()}
        return {"flops": flops.detach(), "labels": y.detach(),
                "keep": {n: m.detach().mean(dim=1) for n, m in masks.items()},
                "masks": {n: m.detach() >= 0.5 for n, m in masks.items()},
                "layer_flops": {n: f.detach() for n, f in per_layer.items()}}

    def on_validation_epoch_start(self) -> None:
        """The training phases' hook (e.g. BatchNorm statistics of the hard network before evaluation)."""
        self.phases.on_validation_epoch_start()

    def on_train_epoch_end(self) -> None:
        """The training phases' hook, before ModelCheckpoint saves."""
        self.phases.on_train_epoch_end()

    def param_groups(self) -> list[dict[str, Any]]:
        """Backbone parameters with weight decay; gate parameters with their own lr and no weight decay."""
        hp = self.hparams
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        gate_ids = {id(p) for n, p in trainable if GATE_ATTR in n}
        groups = [{"params": [p for _, p in trainable if id(p) not in gate_ids], "weight_decay": hp.weight_decay}]
        if gate_ids:
            gate_lr = hp.gate_lr if hp.gate_lr is not None else 0.5 if hp.optimizer == "sgd" else 10 * hp.lr
            groups.append({"params": [p for _, p in trainable if id(p) in gate_ids], "weight_decay": 0.0,
                           "lr": gate_lr})
        return groups
