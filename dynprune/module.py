"""GatedClassifier: a LightningModule training a backbone and its gates jointly.

loss = task + lam * penalty(cost) [+ per-layer budget + batch shaping + distillation] + the gate
families' own terms. cost per input is the effective-FLOPs ratio (``cost="flops"``) or the mean kept
fraction (``cost="count"``); penalty(c) = c, or |c - target| / (c - target)^2 in target mode. The
module knows the Gate interface only: what a family adds (a REINFORCE surrogate, ...) comes from
``Gate.training_loss``. The same module trains dense and statically pruned models (``gate=None``), so
every method in a comparison shares one loop, optimiser and schedule.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from dynprune import backbones
from dynprune.checks import check_number
from dynprune.data import check_num_classes
from dynprune.flops import FlopsProfile
from dynprune.gates import list_gates
from dynprune.granularity import Granularity, resolve
from dynprune.inject import collect_masks, gate_model, gates_of, gating_info
from dynprune.losses import distillation_loss
from dynprune.objective import Objective
from dynprune.optim import check_optimizer_args, optimizer_and_schedule
from dynprune.steps import ClassifierSteps
from dynprune.teacher import check_teacher, freeze, teacher_from_checkpoint, warm_start
from dynprune.trace import GATE_ATTR, trace_layers


def _check_args(gate: str | None, teacher: str | nn.Module | None, dense_epochs: int, distill: float,
                **numbers: float | None) -> None:
    """The arguments of :class:`GatedClassifier` that the objective and the optimiser do not check themselves."""
    if gate is not None and gate not in list_gates():
        raise ValueError(f"unknown gate '{gate}'; choose one of: {', '.join(list_gates())} (or null)")
    check_number("dense_epochs", dense_epochs, 0, integer=True)
    if dense_epochs > 0 and gate is None:
        raise ValueError(f"dense_epochs is a number of epochs (>= 0) before a gate starts, got {dense_epochs} "
                         f"with gate={gate}")
    check_number("distill", distill, 0)
    if distill > 0 and teacher is None and dense_epochs == 0:
        raise ValueError("distill > 0 needs a teacher: set teacher to a checkpoint path or an nn.Module, or "
                         "dense_epochs to distil from the model as it is after its dense epochs")
    check_number("hard_finetune (a fraction of training)", numbers["hard_finetune"], 0, 1, high_open=True)
    check_number("bn_recalibration (batches)", numbers["bn_recalibration"], 0, integer=True)
    check_number("width_targets", numbers["width_targets"], 0)
    check_number("distill_temperature", numbers["distill_temperature"], 0, low_open=True)
    if numbers["gate_lr"] is not None:
        check_number("gate_lr", numbers["gate_lr"], 0, low_open=True)


class GatedClassifier(ClassifierSteps, L.LightningModule):
    """Backbone + gates, trained with task loss + lam * cost (+ optional terms).

    Args:
        backbone: a registered backbone name, or an nn.Module (gated already or not).
        gate: gate family (``sigmoid``, ``l1``, ``policy``, ``gumbel``, ...) or None for a dense/static model.
        granularity: ``channel``, ``block``, ``width``, a list of them (block gates outside, channel gates
            inside), or {name: {option: value}} for a granularity's options (e.g. ``{"width": {"widths": [0.5, 1]}}``).
        lam: weight of the cost penalty (>= 0).
        cost: ``flops`` (effective-FLOPs ratio) or ``count`` (mean kept fraction).
        target: if set, penalise the distance of the batch-mean cost to ``target`` instead of the cost.
        target_loss: ``abs`` (|c - t|) or ``squared`` ((c - t)^2).
        where: module-name patterns to gate (a list, or {granularity: list} with several granularities).
        gate_kwargs: e.g. ``{"reduction": 4, "init_bias": 3.0}``.
        init_from: a checkpoint of a dense run of the same backbone to warm-start from (weights only; it is not
            a teacher unless also given as ``teacher``).
        teacher: the model to distil from when ``distill`` > 0: a dynprune checkpoint path (its model is rebuilt
            from the checkpoint's hyperparameters) or an nn.Module, of any architecture with the student's inputs
            and classes. It is frozen, in eval mode, runs with its gates switched off if it is gated, is not a
            submodule (not in ``state_dict``), and its weights are saved in every checkpoint, so a resumed run
            distils from the same teacher.
        dense_epochs: the warm start inside one run: the first ``dense_epochs`` epochs train the backbone with
            its gates switched off (no cost terms), then the gates start, with a fresh cosine learning-rate
            schedule and, if ``distill`` > 0 and no ``teacher`` is given, the model as it is at that moment as
            the frozen teacher. Every
            schedule of the gated objective (budget annealing, batch-shaping and logit-penalty decay,
            ``hard_finetune``) counts the gated epochs only.
        gate_lr: learning rate of gate parameters (default: 0.5 with SGD, 10 x ``lr`` with Adam: fast enough
            that every family reaches a FLOPs target within a short run); gates get no weight decay.
        bn_recalibration: for families with soft training decisions (``needs_bn_recalibration``): before each
            validation (and at each epoch's end when none ran), re-estimate BatchNorm statistics over this many
            training batches with hard decisions.
        width_targets: weight of DS-Net's gate targets for ``width`` sites: per input, the smallest width
            if the network at its smallest widths already classifies it right, else the largest; a binary
            cross-entropy between every width unit's probability and that target (0 = off).
        hard_finetune: for those families, the final fraction of training in which the gates decide as at
            inference (hard, so the rest of the network adapts to the thresholded masks it will run with; the
            gates keep learning through a straight-through gradient). 0 trains soft to the end.
        budget: weight of the per-layer bounded budget: each site's FLOPs ratio kept within
            [target - budget_width, target + budget_width], the bounds annealed from [0, 1] over the first
            ``budget_anneal`` of training (DGNet/DynConv style).
        batch_shaping: weight of the batch-shaping loss (Bejnordi et al.: per gate, the batch's probabilities
            match a Beta(0.6, 0.4) prior), decayed linearly to 0 over the first ``batch_shaping_warmup`` of training.
        logit_penalty: weight of the mean squared gate score G(x), decayed linearly to 0 over the first
            ``logit_penalty_warmup`` of training: keeps gates near their decision boundary while the network
            learns which inputs need which units (saturated scores give every input the same mask).
        distill: weight of KL(teacher || student) from ``teacher``, or else from the model at the end of the
            ``dense_epochs`` (0: off).
        distill_temperature: softmax temperature of distillation.
        frozen: module-name patterns kept in eval mode with frozen parameters during fit (default: none;
            every other part of the model is put in train mode at the start of each fit, whatever mode
            the model object arrived in).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet20",
        gate: str | None = "sigmoid",
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
    ) -> None:
        super().__init__()
        _check_args(gate, teacher, dense_epochs, distill, hard_finetune=hard_finetune,
                    bn_recalibration=bn_recalibration, width_targets=width_targets,
                    distill_temperature=distill_temperature, gate_lr=gate_lr)
        check_optimizer_args(optimizer, lr, momentum, weight_decay)
        self.objective = Objective(lam, cost, target, target_loss, budget, budget_width, budget_anneal,
                                   batch_shaping, batch_shaping_warmup, logit_penalty, logit_penalty_warmup)
        self.save_hyperparameters(ignore=[k for k, v in (("backbone", backbone), ("teacher", teacher))
                                          if isinstance(v, nn.Module)])
        if isinstance(backbone, str):
            check_number("width_mult", width_mult, 0, low_open=True)
            check_number("depth_mult", depth_mult, 0, low_open=True)
            model = backbones.create(backbone, num_classes, in_chans, input_size, width_mult, depth_mult)
        else:
            model = backbone
        self.model = model
        self.gated = hasattr(model, "dynprune")
        if gate is not None and not self.gated:
            self._gate(gate, resolve(granularity), where, gate_kwargs or {})
        shape = model.dynprune.flops.input_shape if self.gated else tuple(
            getattr(model, "input_shape", (in_chans, input_size, input_size)))
        self._check_outputs(shape, num_classes)
        self.example_input_array = torch.zeros(2, *shape)  # model summary: sizes and FLOPs
        if self.gated:
            self.profile = model.dynprune.flops
        else:
            self.profile = FlopsProfile.build(model, shape, trace_layers(model, torch.zeros(1, *shape)))
        self.static_flops: int | None = None  # set by dynprune.static.StaticPruning: physically pruned FLOPs
        # some family trains with soft decisions: BN recalibration and the hard fine-tune phase apply
        self._soft_gates = self.gated and any(g.needs_bn_recalibration for g in gates_of(self.model).values())
        if init_from is not None:
            warm_start(self.model, init_from)
        if teacher is not None and distill > 0:
            teacher = teacher_from_checkpoint(teacher, GatedClassifier) if isinstance(teacher, str) else freeze(teacher)
            check_teacher(teacher, shape, num_classes)
        object.__setattr__(self, "_teacher", teacher if distill > 0 else None)  # not a submodule
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes)
        self.test_acc = MulticlassAccuracy(num_classes)

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
        self.gated = True

    @torch.no_grad()
    def _check_outputs(self, shape: tuple[int, ...], num_classes: int) -> None:
        """The model must map (N, *shape) to (N, num_classes)."""
        was_training = self.model.training
        try:
            out = self.model.eval()(torch.zeros(1, *shape, device=next(self.model.parameters()).device))
        except RuntimeError as err:
            dims = ", ".join(map(str, shape))
            raise ValueError(f"backbone does not accept inputs of shape (N, {dims}): {err}") from err
        finally:
            self.model.train(was_training)
        if out.shape != (1, num_classes):
            raise ValueError(f"num_classes={num_classes} but the backbone outputs shape {tuple(out.shape[1:])}")

    def setup(self, stage: str) -> None:
        """Flush denormals: soft masks near 0 otherwise make CPU convolutions ~10x slower."""
        torch.set_flush_denormal(True)
        self._check_data(getattr(self._trainer, "datamodule", None))

    def on_fit_start(self) -> None:
        """Own the model's mode: train mode for everything but the ``frozen`` parts (a model handed over in
        eval mode would otherwise train with frozen BatchNorm statistics)."""
        self.model.train()
        for pattern in self.hparams.frozen or []:
            matched = [m for n, m in self.model.named_modules() if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(f"frozen pattern '{pattern}' matches no module of the model")
            for module in matched:
                module.eval().requires_grad_(False)
        if self._teacher is not None:
            self._teacher.to(self.device)
        if self.hparams.dense_epochs >= (self.trainer.max_epochs or 0) > 0:
            raise ValueError(f"dense_epochs={self.hparams.dense_epochs} leaves no gated epoch in "
                             f"max_epochs={self.trainer.max_epochs}")

    def in_dense_phase(self) -> bool:
        """Whether this epoch of ``fit`` is one of the first ``dense_epochs`` (gates off)."""
        return (self.hparams.dense_epochs > 0 and self._trainer is not None and self.trainer.state.fn == "fit"
                and self.current_epoch < self.hparams.dense_epochs)

    def on_train_epoch_start(self) -> None:
        """Switch the gates off for the dense epochs; when the gated phase starts, freeze the teacher."""
        if not self.gated or not self.hparams.dense_epochs:
            return
        self.model.dynprune.switch.enabled = not self.in_dense_phase()
        if self.hparams.distill > 0 and self._teacher is None and not self.in_dense_phase():
            object.__setattr__(self, "_teacher", freeze(self.model))

    def on_fit_end(self) -> None:
        """Leave the gates on, whatever phase ``fit`` stopped in."""
        if self.gated:
            self.model.dynprune.switch.enabled = True

    def _check_data(self, datamodule: L.LightningDataModule | None) -> None:
        """The datamodule's classes and ``in_chans``/``input_size`` (when it declares them) must match the model's."""
        if datamodule is not None:
            check_num_classes(datamodule, self.hparams.num_classes)
        shape = self.profile.input_shape
        if len(shape) != 3:
            return
        for attr, expected in (("in_chans", shape[0]), ("input_size", shape[1])):
            value = getattr(datamodule, attr, None)
            if value is not None and value != expected:
                raise ValueError(f"the data has {attr}={value} but the model expects {attr}={expected} "
                                 f"(input shape {shape}); set model.{attr}={value} or change the data")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the torch RNG state: stochastic gates sample from it, so a resumed run stays exact."""
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if self._teacher is not None:  # a resumed run distils from these weights, whatever the path holds by then
            checkpoint["dynprune_teacher"] = self._teacher.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG state when resuming ``fit`` (not when only loading weights), and the teacher's weights
        (a teacher made from the model at the end of its dense epochs is made again first)."""
        if "torch_rng_state" in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(checkpoint["torch_rng_state"])
        if "dynprune_teacher" in checkpoint and self.hparams.distill > 0:
            if self._teacher is None:
                object.__setattr__(self, "_teacher", freeze(self.model))
            self._teacher.load_state_dict(checkpoint["dynprune_teacher"])

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> logits (N, num_classes)."""
        return self.model(x)

    def masks(self) -> dict[str, Tensor]:
        """Decisions of the last forward pass per site ({} for a dense model or while the gates are off)."""
        return collect_masks(self.model) if self.gated and self.model.dynprune.switch.enabled else {}

    def progress(self) -> float:
        """Fraction of the gated training done, in [0, 1] (the ``dense_epochs`` do not count)."""
        if self._trainer is None:
            return 0.0
        total = self.trainer.estimated_stepping_batches
        if not total or total == float("inf"):
            return 0.0
        done = self.global_step / total
        dense = self.hparams.dense_epochs / self.trainer.max_epochs if self.hparams.dense_epochs else 0.0
        return min(1.0, max(0.0, (done - dense) / (1 - dense)))

    @contextmanager
    def _hard_gates(self, mode: str = "hard") -> Iterator[None]:
        """Every gate decides deterministically (BatchNorm keeps its own mode); ``mode="finetune"`` keeps a
        straight-through gradient to the gates."""
        all_gates = gates_of(self.model)
        modes = {n: g.mode for n, g in all_gates.items()}
        for g in all_gates.values():
            g.set_mode(mode)
        try:
            yield
        finally:
            for n, g in all_gates.items():
                g.set_mode(modes[n])

    def _greedy(self, x: Tensor, y: Tensor) -> Any:
        """A lazy rollout of the same batch with hard gates: (task loss (N,), {site: own cost (N,)}, cost (N,)).

        BatchNorm running statistics and the gates' last decisions are left as the training pass set them.
        """
        cache: list[tuple[Tensor, dict[str, Tensor], Tensor]] = []

        def rollout() -> tuple[Tensor, dict[str, Tensor], Tensor]:
            if cache:
                return cache[0]
            with torch.no_grad(), self._side_pass(), self._hard_gates():
                task = F.cross_entropy(self.model(x), y, reduction="none")
                cost, _, site = self.objective.costs(collect_masks(self.model), self.profile)
            cache.append((task, site, cost))
            return cache[0]

        return rollout

    @contextmanager
    def _side_pass(self) -> Iterator[None]:
        """An extra forward pass inside a training step that leaves no trace: BatchNorm updates copies of its
        running statistics (the training graph holds the originals) and the gates keep their last decisions."""
        all_gates = gates_of(self.model)
        kept = {n: (g.mask, g.probs, g.scores, g.forced) for n, g in all_gates.items()}
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [dict(m._buffers) for m in norms]
        for m in norms:
            m._buffers.update({k: v.clone() for k, v in m._buffers.items() if v is not None})
        try:
            yield
        finally:
            for m, buffers in zip(norms, saved, strict=True):
                m._buffers.update(buffers)
            for n, g in all_gates.items():
                g.mask, g.probs, g.scores, g.forced = kept[n]

    def width_target_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """DS-Net's gate targets: (BCE of the width units' probabilities against the targets, targets (N,)),
        the target 0 (smallest width) where the network at its smallest widths classifies the input right,
        else 1 (largest). Call after the training forward pass (it reads the gates' probabilities)."""
        info = gating_info(self.model)
        sites = {n: g for n, g in gates_of(self.model).items() if info.sites[n].granularity == "width"}
        if not sites:
            raise ValueError("width_targets needs width sites: set granularity='width' (or include it)")
        probs = {n: g.probs for n, g in sites.items()}
        with torch.no_grad(), self._side_pass():
            for g in sites.values():
                g.force(torch.zeros(g.fc2.out_features, device=x.device))
            small_right = self.model(x).argmax(dim=1) == y
        target = (~small_right).to(x.dtype)
        bce = [F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), target[:, None].expand_as(p)) for p in probs.values()]
        return torch.stack(bce).mean(), target

    def _hard_finetuning(self) -> bool:
        """Whether this step is in the final ``hard_finetune`` fraction of a soft family's training."""
        return (self._soft_gates and self.hparams.hard_finetune > 0
                and self.progress() >= 1 - self.hparams.hard_finetune)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """task loss + lam * penalty (+ optional terms, + the gate families' own terms)."""
        x, y = batch
        with self._hard_gates("finetune") if self._hard_finetuning() else nullcontext():
            logits = self(x)
        task = F.cross_entropy(logits, y, reduction="none")
        loss = task.mean()
        self.train_acc(logits, y)
        metrics: dict[str, Any] = {"train/task_loss": loss.detach(), "train/acc": self.train_acc}
        teacher_logits = None
        if self._teacher is not None:
            with torch.no_grad():
                teacher_logits = self._teacher(x)
            kd = self.hparams.distill * distillation_loss(logits, teacher_logits, self.hparams.distill_temperature)
            loss = loss + kd
            metrics["train/distill"] = kd.detach()
        if self.gated and not self.in_dense_phase():
            masks, all_gates, progress = self.masks(), gates_of(self.model), self.progress()
            per_layer = self.profile.per_layer(masks)  # once per step: the cost and the budget both need it
            cost, ratio, site_costs = self.objective.costs(masks, self.profile, per_layer)
            penalty = self.objective.penalty(cost.mean())
            terms = {"penalty": penalty,
                     **self.objective.extra_terms(all_gates, masks, self.profile, progress, per_layer)}
            family = self.objective.family_terms(all_gates, task, site_costs, self.objective.price(cost.mean()),
                                                 self._greedy(x, y), progress)
            if family is not None:
                terms["family"] = family
            if self.hparams.width_targets > 0:
                terms["width_targets"] = self.hparams.width_targets * self.width_target_loss(x, y)[0]
            loss = loss + sum(terms.values())
            metrics.update({f"train/{k}": v.detach() for k, v in terms.items()})
            metrics["train/flops_ratio"] = ratio.mean().detach()
            metrics["train/keep"] = torch.cat([m.detach().flatten() for m in masks.values()]).mean()
        metrics["train/loss"] = loss.detach()
        self.log_dict(metrics, prog_bar=False, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, acc: MulticlassAccuracy) -> dict[str, Any]:
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

    def _needs_recalibration(self) -> bool:
        return (self._soft_gates and self.hparams.bn_recalibration > 0 and self.trainer.state.fn == "fit"
                and not self.in_dense_phase())

    def on_validation_epoch_start(self) -> None:
        """Families with soft training decisions are hard at eval: recalibrate BatchNorm for that network."""
        if self._needs_recalibration() and not self.trainer.sanity_checking:
            self.recalibrate_norms(self.trainer.train_dataloader, self.hparams.bn_recalibration)
            self._calibrated_at = self.global_step

    def on_train_epoch_end(self) -> None:
        """Recalibrate at each epoch's end unless a validation already did after the last step, so that the
        checkpoint and a later ``test`` see statistics of the hard network even when no validation runs
        (``limit_val_batches=0``); runs before ModelCheckpoint saves."""
        if self._needs_recalibration() and getattr(self, "_calibrated_at", None) != self.global_step:
            self.recalibrate_norms(self.trainer.train_dataloader, self.hparams.bn_recalibration)
            self._calibrated_at = self.global_step

    @torch.no_grad()
    def recalibrate_norms(self, loader: Iterable[tuple[Tensor, Tensor]], batches: int) -> None:
        """Recompute every BatchNorm's running mean/var as the average over ``batches`` batches of
        ``loader``, with the network in train mode but its gates deciding hard."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        was_training = self.model.training
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        self.model.train()
        try:
            with self._hard_gates():
                for _, (x, _) in zip(range(batches), loader, strict=False):
                    self.model(x.to(self.device))
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
            self.model.train(was_training)

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD (nesterov) or Adam with cosine decay; gate parameters: own lr, no weight decay."""
        hp = self.hparams
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        gate_params = [p for n, p in trainable if GATE_ATTR in n]
        gate_ids = {id(p) for p in gate_params}
        groups = [{"params": [p for _, p in trainable if id(p) not in gate_ids], "weight_decay": hp.weight_decay}]
        if gate_params:
            gate_lr = hp.gate_lr if hp.gate_lr is not None else 0.5 if hp.optimizer == "sgd" else 10 * hp.lr
            groups.append({"params": gate_params, "weight_decay": 0.0, "lr": gate_lr})
        return optimizer_and_schedule(groups, hp.optimizer, hp.lr, hp.momentum,
                                      self.trainer.max_epochs if self._trainer else None, restart_at=hp.dense_epochs)
