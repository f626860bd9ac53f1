"""GatedClassifier: a LightningModule training a backbone and its gates jointly.

loss = task + lam * penalty(cost), cost per input being the effective-FLOPs ratio
(``cost="flops"``) or the mean kept fraction over gated layers (``cost="count"``), and
penalty(c) = c, or |c - target| in target mode. Policy gates add the REINFORCE term
-(R - b) * log pi(m|x) with R = -(task loss) - lam * penalty(cost) per input and b a moving
average of R; the backbone is trained by the task loss alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from dynprune import backbones
from dynprune.flops import FlopsProfile
from dynprune.gates import L1Gate, PolicyGate, list_gates
from dynprune.inject import collect_masks, gate_model, gated_layers, gates
from dynprune.trace import trace_layers

COSTS = ("flops", "count")


def _check_args(gate: str | None, lam: float, cost: str, target: float | None, optimizer: str) -> None:
    if gate is not None and gate not in list_gates():
        raise ValueError(f"unknown gate '{gate}'; choose one of: {', '.join(list_gates())} (or null)")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if cost not in COSTS:
        raise ValueError(f"unknown cost '{cost}'; choose one of: {', '.join(COSTS)}")
    if target is not None and not 0 < target <= 1:
        raise ValueError(f"target (FLOPs ratio) must be in (0, 1], got {target}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"unknown optimizer '{optimizer}'; choose one of: adam, sgd")


def dense_to_gated_keys(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename a dense backbone's state_dict keys to those of its gated version."""
    renames = {}
    for name in gated_layers(model):
        renames[name] = f"{name}.layer"
        info = model.dynprune.layers[name]
        if info.norm is not None:
            renames[info.norm] = f"{info.norm}.module"
    out = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        out[f"{renames.get(module, module)}.{param}"] = value
    return out


class GatedClassifier(L.LightningModule):
    """Backbone + gates, trained with task loss + lam * cost.

    Args:
        backbone: a registered backbone name, or an nn.Module (gated already or not).
        gate: gate family (``sigmoid``, ``l1``, ``policy``) or None for a dense baseline.
        lam: weight of the cost penalty (>= 0).
        cost: ``flops`` (effective-FLOPs ratio) or ``count`` (mean kept fraction).
        target: if set, penalise |cost - target| instead of cost (easier to aim than lam).
        where: layer-name patterns to gate (default: every eligible conv/linear).
        gate_kwargs: e.g. ``{"reduction": 4, "init_bias": 3.0}``.
        init_from: a checkpoint of a dense run of the same backbone to warm-start from.
        gate_lr: learning rate of gate parameters (default ``lr``); gates get no weight decay.
        baseline_momentum: momentum of the REINFORCE moving-average baseline.
        bn_recalibration: for soft-mask (l1) gates: before each validation, re-estimate BatchNorm running
            statistics over this many training batches with the thresholded (eval) masks, so the network
            that is evaluated has statistics of the network that runs (0 disables).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet20",
        gate: str | None = "sigmoid",
        lam: float = 0.5,
        cost: str = "flops",
        target: float | None = None,
        num_classes: int = 10,
        in_chans: int = 1,
        input_size: int = 28,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        where: list[str] | None = None,
        gate_kwargs: dict[str, float] | None = None,
        init_from: str | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        gate_lr: float | None = None,
        baseline_momentum: float = 0.9,
        bn_recalibration: int = 50,
    ) -> None:
        super().__init__()
        _check_args(gate, lam, cost, target, optimizer)
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if isinstance(backbone, str):
            model = backbones.create(backbone, num_classes, in_chans, input_size, width_mult, depth_mult)
        else:
            model = backbone
        if gate is not None and not hasattr(model, "dynprune"):
            gate_model(model, gate, where=where, **(gate_kwargs or {}))
        self.model = model
        self.gated = hasattr(model, "dynprune")
        shape = model.dynprune.flops.input_shape if self.gated else tuple(
            getattr(model, "input_shape", (in_chans, input_size, input_size)))
        self._check_outputs(shape, num_classes)
        self.example_input_array = torch.zeros(2, *shape)  # model summary: sizes and FLOPs
        if self.gated:
            self.profile = model.dynprune.flops
        else:
            self.profile = FlopsProfile.build(model, shape, trace_layers(model, torch.zeros(1, *shape)), set())
        self.static_flops: int | None = None  # set by dynprune.static.StaticPruning: physically pruned FLOPs
        if init_from is not None:
            self._warm_start(init_from)
        self.register_buffer("reward_baseline", torch.zeros(()))
        self.register_buffer("baseline_steps", torch.zeros((), dtype=torch.long))
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes)
        self.test_acc = MulticlassAccuracy(num_classes)

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

    def _warm_start(self, path: str) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("model."): v for k, v in ckpt.get("state_dict", ckpt).items()
                 if k.startswith("model.") or "state_dict" not in ckpt}
        if self.gated:
            state = dense_to_gated_keys(state, self.model)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if ".gate." not in k]
        if missing or unexpected:
            raise ValueError(f"init_from={path} does not match the backbone: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")

    def setup(self, stage: str) -> None:
        """Flush denormals: soft masks near 0 otherwise make CPU convolutions ~10x slower."""
        torch.set_flush_denormal(True)
        self._check_data(getattr(self._trainer, "datamodule", None))

    def _check_data(self, datamodule: L.LightningDataModule | None) -> None:
        """The datamodule's ``in_chans``/``input_size`` (when it declares them) must match the model's."""
        shape = self.profile.input_shape
        if len(shape) != 3:
            return
        for attr, expected in (("in_chans", shape[0]), ("input_size", shape[1])):
            value = getattr(datamodule, attr, None)
            if value is not None and value != expected:
                raise ValueError(f"the data has {attr}={value} but the model expects {attr}={expected} "
                                 f"(input shape {shape}); set model.{attr}={value} or change the data")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the torch RNG state: policy gates sample from it, so a resumed run stays exact."""
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG state when resuming ``fit`` (not when only loading weights)."""
        if "torch_rng_state" in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(checkpoint["torch_rng_state"])

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> logits (N, num_classes)."""
        return self.model(x)

    def masks(self) -> dict[str, Tensor]:
        """Masks of the last forward pass ({} for a dense model)."""
        return collect_masks(self.model) if self.gated else {}

    def cost_per_input(self, masks: dict[str, Tensor], flops_ratio: Tensor) -> Tensor:
        """(N,) cost of each input: the effective-FLOPs ratio (given) or the mean kept fraction."""
        if self.hparams.cost == "count":
            return torch.stack([m.mean(dim=1) for m in masks.values()]).mean(dim=0)
        return flops_ratio

    def _penalty(self, cost: Tensor) -> Tensor:
        target = self.hparams.target
        return cost if target is None else (cost - target).abs()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """task loss + lam * penalty (+ REINFORCE term for policy gates)."""
        x, y = batch
        logits = self(x)
        task = F.cross_entropy(logits, y, reduction="none")
        loss = task.mean()
        self.train_acc(logits, y)
        metrics = {"train/task_loss": loss.detach(), "train/acc": self.train_acc}
        if self.gated:
            masks = self.masks()
            flops_ratio = self.profile.ratio(masks)
            cost = self.cost_per_input(masks, flops_ratio)
            lam = self.hparams.lam
            if self.hparams.target is None:
                loss = loss + lam * cost.mean()
            else:
                loss = loss + lam * (cost.mean() - self.hparams.target).abs()
            log_probs = [g.gate.log_prob for g in gated_layers(self.model).values()
                         if isinstance(g.gate, PolicyGate)]
            if log_probs:
                reward = self.reward(task.detach(), self._penalty(cost.detach()))
                advantage = reward - self._update_baseline(reward)
                loss = loss - (advantage * torch.stack(log_probs).sum(dim=0)).mean()
                metrics["train/reward"] = reward.mean()
            metrics["train/flops_ratio"] = flops_ratio.mean().detach()
            metrics["train/keep"] = torch.cat([m.detach().flatten() for m in masks.values()]).mean()
        metrics["train/loss"] = loss.detach()
        self.log_dict(metrics, prog_bar=False, on_step=False, on_epoch=True)
        return loss

    def reward(self, task_loss: Tensor, penalty: Tensor) -> Tensor:
        """REINFORCE reward per input (N,): -(task loss) - lam * penalty; loss and cost are bad."""
        return -(task_loss + self.hparams.lam * penalty)

    def _update_baseline(self, reward: Tensor) -> Tensor:
        """Moving-average baseline b (a buffer, so it is checkpointed); returns b before the update."""
        mean = reward.mean()
        if self.baseline_steps == 0:
            self.reward_baseline.copy_(mean)
        baseline = self.reward_baseline.clone()
        m = self.hparams.baseline_momentum
        self.reward_baseline.mul_(m).add_((1 - m) * mean)
        self.baseline_steps += 1
        return baseline

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
        return {"flops": flops.detach(),
                "keep": {n: m.detach().mean(dim=1) for n, m in masks.items()},
                "layer_flops": {n: f.detach() for n, f in per_layer.items()}}

    def on_validation_epoch_start(self) -> None:
        """Soft-mask gates are thresholded at eval: recalibrate BatchNorm statistics for that network."""
        soft = self.gated and any(isinstance(g, L1Gate) for g in gates(self.model))
        if soft and self.hparams.bn_recalibration > 0 and self.trainer.state.fn == "fit" \
                and not self.trainer.sanity_checking:
            self.recalibrate_norms(self.trainer.train_dataloader, self.hparams.bn_recalibration)

    @torch.no_grad()
    def recalibrate_norms(self, loader: Iterable[tuple[Tensor, Tensor]], batches: int) -> None:
        """Recompute every BatchNorm's running mean/var as the average over ``batches`` batches of
        ``loader``, with the network in train mode but its gates in eval mode (thresholded masks)."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        was_training = self.model.training
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        self.model.train()
        for layer in gated_layers(self.model).values():
            layer.gate.eval()
        try:
            for _, (x, _) in zip(range(batches), loader, strict=False):
                self.model(x.to(self.device))
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
            self.model.train(was_training)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class predictions (N,)."""
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD (nesterov) or Adam with cosine decay; gate parameters: own lr, no weight decay."""
        hp = self.hparams
        gate_params = [p for n, p in self.model.named_parameters() if ".gate." in n]
        gate_ids = {id(p) for p in gate_params}
        groups = [{"params": [p for p in self.model.parameters() if id(p) not in gate_ids],
                   "weight_decay": hp.weight_decay}]
        if gate_params:
            gate_lr = hp.lr if hp.gate_lr is None else hp.gate_lr
            groups.append({"params": gate_params, "weight_decay": 0.0, "lr": gate_lr})
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=True)
        else:
            opt = torch.optim.Adam(groups, lr=hp.lr)
        epochs = self.trainer.max_epochs if self.trainer and self.trainer.max_epochs else 0
        if epochs < 1:
            return {"optimizer": opt}
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": sched}
