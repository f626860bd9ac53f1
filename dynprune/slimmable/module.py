"""SlimmableClassifier: trains every width of a slimmable supernet at once (Yu et al. 2019/2019b).

Each step runs the largest width on the labels and then, by the sandwich rule, the smallest width
and ``num_random`` random widths of the list (or every width with ``rule="all"``); with in-place
distillation the smaller widths learn the largest width's detached soft output (KL at temperature
T, scaled by T^2) instead of the labels. The per-width losses are averaged (``reduction="mean"``,
so one update has the size of one width's, and the thin networks' lr is a fair comparison) or
summed as in the paper (``reduction="sum"``, which at lr 0.1 diverged in our short runs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from dynprune import backbones
from dynprune.checks import check_number
from dynprune.flops import FlopsProfile, count_flops
from dynprune.optim import check_optimizer_args
from dynprune.slimmable.convert import ThinBackbone, make_slimmable, set_width, spec_of
from dynprune.task import ClassificationTask
from dynprune.trace import trace_layers

RULES = ("sandwich", "all")
REDUCTIONS = ("mean", "sum")


def distill_loss(logits: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of (N, K) logits at ``temperature``, times T^2 (batch mean)."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


class SlimmableClassifier(ClassificationTask):
    """A slimmable supernet trained with the sandwich rule and in-place distillation.

    Args:
        backbone: a registered backbone name (width ``w`` is then exactly that backbone at
            ``width_mult=w``) or an nn.Module (slimmable already, or converted with the ceil rule).
        widths: the widths trained, each with its own BatchNorms (default 0.25/0.5/0.75/1.0).
        rule: ``sandwich`` (largest + smallest + ``num_random`` random widths per step) or ``all``.
        num_random: random widths per sandwich step, drawn from the widths strictly between the ends.
        distill: in-place distillation from the largest width (else every width learns the labels).
        temperature: softmax temperature of the distillation.
        reduction: ``mean`` or ``sum`` of the per-width losses of a step.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet20",
        widths: list[float] | None = None,
        rule: str = "sandwich",
        num_random: int = 2,
        distill: bool = True,
        temperature: float = 1.0,
        reduction: str = "mean",
        num_classes: int = 10,
        in_chans: int = 1,
        input_size: int = 28,
        depth_mult: float = 1.0,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown rule '{rule}'; choose one of: {', '.join(RULES)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction '{reduction}'; choose one of: {', '.join(REDUCTIONS)}")
        check_number("num_random", num_random, 0, integer=True)
        check_number("temperature", temperature, 0, low_open=True)
        check_optimizer_args(optimizer, lr, momentum, weight_decay)
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if isinstance(backbone, str):
            kwargs = dict(num_classes=num_classes, in_chans=in_chans, input_size=input_size, depth_mult=depth_mult)
            model = make_slimmable(backbones.create(backbone, **kwargs), widths, ThinBackbone(backbone, kwargs))
        else:
            model = backbone if hasattr(backbone, "slimmable") else make_slimmable(backbone, widths)
        self.model = model
        spec = spec_of(model)
        self.widths = sorted(spec.widths[: spec.trained])
        shape = spec.input_shape
        self.example_input_array = torch.zeros(2, *shape)
        self.flops = {w: count_flops(set_width(model, w), shape)[0] for w in self.widths}
        set_width(model, self.widths[-1])
        self.profile = FlopsProfile.build(model, shape, trace_layers(model, torch.zeros(1, *shape)))
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = nn.ModuleList(MulticlassAccuracy(num_classes) for _ in self.widths)
        self.test_acc = nn.ModuleList(MulticlassAccuracy(num_classes) for _ in self.widths)

    def step_widths(self) -> list[float]:
        """Widths of one training step, largest first (it is the teacher)."""
        if self.hparams.rule == "all" or len(self.widths) <= 2:
            return self.widths[::-1]
        middle = self.widths[1:-1]
        picks = torch.randint(len(middle), (self.hparams.num_random,)).tolist()
        return [self.widths[-1], self.widths[0], *(middle[i] for i in picks)]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Mean (or sum) of the per-width losses: labels for the largest, distillation (or labels) for the rest."""
        x, y = batch
        loss, teacher = x.new_zeros(()), None
        metrics: dict[str, Any] = {}
        widths = self.step_widths()
        for w in widths:
            set_width(self.model, w)
            logits = self.model(x)
            if teacher is None or not self.hparams.distill:
                part = F.cross_entropy(logits, y)
            else:
                part = distill_loss(logits, teacher, self.hparams.temperature)
            if teacher is None:
                teacher = logits.detach()
                self.train_acc(logits, y)
            metrics[f"train/loss_w{w:g}"] = part.detach()
            loss = loss + part
        set_width(self.model, self.widths[-1])
        if self.hparams.reduction == "mean":
            loss = loss / len(widths)
        metrics.update({"train/loss": loss.detach(), "train/acc": self.train_acc})
        self.log_dict(metrics, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, accs: nn.ModuleList) -> dict[str, Any]:
        """Accuracy and FLOPs at every width; ``<stage>/acc`` and the returned per-input FLOPs are the largest's."""
        x, y = batch
        metrics: dict[str, Any] = {}
        for w, acc in zip(self.widths, accs, strict=True):
            set_width(self.model, w)
            logits = self.model(x)
            acc(logits, y)
            metrics[f"{stage}/acc_w{w:g}"] = acc
            metrics[f"{stage}/flops_w{w:g}"] = float(self.flops[w])
        metrics[f"{stage}/loss"] = F.cross_entropy(logits, y)
        metrics[f"{stage}/acc"] = accs[-1]
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)
        return {"flops": torch.full((len(x),), float(self.flops[self.widths[-1]]), device=x.device),
                "labels": y.detach(), "keep": {}, "layer_flops": {}}
