"""CollapseGuard: stop a run whose gates have collapsed or whose loss is no longer finite.

Failures are raised as :class:`GuardError` (a RuntimeError), so a CLI run exits non-zero with the
message and a sweep can record the point as failed. The exception is raised before any checkpoint
of the bad state is written: a NaN/inf loss is caught before its backward pass (the weights are
still those of the last good step), a collapse at the end of validation (before ModelCheckpoint,
which Lightning always runs last, saves), and ``on_save_checkpoint`` refuses to write non-finite
weights however they arose.

Two collapses are watched, on the gates' decisions over every validation input (read with
``dynprune.inject.collect_masks``):

- a **dead network**: every gate of every gated site is closed for every input, residual-branch and
  block gates included, and validation accuracy is at most chance (1/num_classes) + ``chance_margin``;
- a **dead layer**: one site is closed for every input where that cuts the network (a site whose
  output only feeds a residual branch just skips the branch, which is legitimate, so it never counts).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dynprune.inject import collect_masks, gating_info

FAIL_ON = ("off", "on", "both", "none")
NETWORK = ("stop", "warn", "ignore")


def _is_gated(model: nn.Module) -> bool:
    """Whether the model is gated and its gates are on (not in a dense warm-up)."""
    try:
        info = gating_info(model)
    except ValueError:
        return False
    return info.switch.enabled


def skippable_sites(model: nn.Module, names: list[str]) -> set[str]:
    """Sites among ``names`` whose all-closed gate skips work (a residual branch, a block) instead of cutting the
    network, as each site's granularity says (see ``GatingInfo.bypassed``)."""
    return set(names) & set(gating_info(model).bypassed)


class GuardError(RuntimeError):
    """A run stopped by :class:`CollapseGuard`; the message says what happened and what to change."""


class CollapseGuard(L.Callback):
    """Stops training when the gates collapse or the training loss becomes NaN/inf.

    Dead network (``network``): every gate of every site, residual and block gates included, is closed
    for every validation input and the monitored accuracy is at most chance + ``chance_margin``, for
    ``patience`` consecutive validation epochs (sanity checks excluded). A tiny network that still
    classifies (accuracy above chance) is not a collapse.

    Per site (``fail_on``): "off" when every unit is off for every validation input, except a site whose
    output only feeds a residual branch (that skips the branch, a legitimate outcome); "on" when every unit
    is on for every input (the gate never prunes). Either must persist for ``patience`` epochs.

    Args:
        patience: consecutive validation epochs a collapse must last.
        fail_on: which per-site collapse stops the run: ``off`` (default; a dead layer), ``on``, ``both``
            or ``none``.
        network: what a dead network does in ``fit``: ``stop`` (default, raise GuardError), ``warn`` (a warning
            each epoch) or ``ignore``; ``validate`` only warns.
        chance_margin: accuracy up to 1/num_classes + this counts as chance.
        monitor: the accuracy metric compared with chance.
        check_finite: stop on a NaN/inf training loss and refuse to checkpoint non-finite weights.
    """

    def __init__(self, patience: int = 3, fail_on: str = "off", network: str = "stop", chance_margin: float = 0.05,
                 monitor: str = "val/acc", check_finite: bool = True) -> None:
        super().__init__()
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if fail_on not in FAIL_ON:
            raise ValueError(f"unknown fail_on '{fail_on}'; choose one of: {', '.join(FAIL_ON)}")
        if network not in NETWORK:
            raise ValueError(f"unknown network '{network}'; choose one of: {', '.join(NETWORK)}")
        self.patience, self.fail_on, self.network = patience, fail_on, network
        self.chance_margin, self.monitor, self.check_finite = chance_margin, monitor, check_finite
        self.streaks: dict[str, int] = {}
        self._lo: dict[str, Tensor] = {}
        self._hi: dict[str, Tensor] = {}
        self._all_closed = False

    def _kinds(self) -> tuple[str, ...]:
        return {"off": ("off",), "on": ("on",), "both": ("off", "on"), "none": ()}[self.fail_on]

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._lo, self._hi, self._all_closed = {}, {}, False

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Track each site's lowest and highest per-input kept fraction over the epoch."""
        model = getattr(pl_module, "model", pl_module)
        if trainer.sanity_checking or not _is_gated(model):
            return
        for name, mask in collect_masks(model).items():
            keep = mask.detach().float().mean(dim=1)
            lo, hi = keep.min(), keep.max()
            self._lo[name] = torch.minimum(self._lo[name], lo) if name in self._lo else lo
            self._hi[name] = torch.maximum(self._hi[name], hi) if name in self._hi else hi

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Update the per-site streaks and raise once one reaches ``patience``."""
        if trainer.sanity_checking or not self._lo:
            return
        names = list(self._lo)
        lo, hi = torch.stack([self._lo[n] for n in names]), torch.stack([self._hi[n] for n in names])
        if trainer.world_size > 1:  # every rank must see the same verdict
            lo = pl_module.all_gather(lo).reshape(-1, len(names)).amin(dim=0)
            hi = pl_module.all_gather(hi).reshape(-1, len(names)).amax(dim=0)
        self._all_closed = bool((hi == 0).all())
        state = {"off": hi == 0, "on": lo == 1}
        skippable = skippable_sites(getattr(pl_module, "model", pl_module), names) if "off" in self._kinds() else set()
        for kind in self._kinds():
            for name, collapsed in zip(names, state[kind].tolist(), strict=True):
                collapsed = collapsed and not (kind == "off" and name in skippable)
                key = f"{kind}:{name}"
                self.streaks[key] = self.streaks.get(key, 0) + 1 if collapsed else 0
                if self.streaks[key] >= self.patience:
                    raise GuardError(self._collapse_message(pl_module, name, kind, trainer.current_epoch))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The dead-network check, once the epoch's accuracy is known (before ModelCheckpoint saves)."""
        if trainer.sanity_checking or not self._lo or self.network == "ignore":
            return
        acc = trainer.callback_metrics.get(self.monitor)
        hp = getattr(pl_module, "hparams", {})
        num_classes = hp.get("num_classes") or getattr(trainer.datamodule, "num_classes", None)
        if acc is None or not num_classes:
            return
        chance = 1.0 / num_classes
        dead = self._all_closed and float(acc) <= chance + self.chance_margin
        self.streaks["network"] = self.streaks.get("network", 0) + 1 if dead else 0
        if not dead:
            return
        message = (f"CollapseGuard: every gate of all {len(self._lo)} gated sites (residual and block gates "
                   f"included) is closed for every validation input and {self.monitor}={float(acc):.4f} is at "
                   f"chance (1/{num_classes} = {chance:.4f}, margin {self.chance_margin}) at epoch "
                   f"{trainer.current_epoch} ({self.streaks['network']} consecutive epoch(s)): the network "
                   f"computes nothing useful. Lower lam or raise target (now lam={hp.get('lam')}, "
                   f"target={hp.get('target')}), or raise gate_kwargs.init_bias; --guard.network warn|ignore "
                   "changes what happens.")
        if self.network == "warn" or trainer.state.fn != "fit":  # evaluating a collapsed checkpoint: say so
            rank_zero_warn(message)
        elif self.streaks["network"] >= self.patience:
            raise GuardError(message.replace("CollapseGuard:", "CollapseGuard: training stopped:", 1))

    def _collapse_message(self, pl_module: L.LightningModule, layer: str, kind: str, epoch: int) -> str:
        hp = getattr(pl_module, "hparams", {})
        now = f"(now lam={hp.get('lam')}, target={hp.get('target')})"
        if kind == "off":
            what = "every gate is off for every validation input: the layer computes nothing"
            advice = f"lower lam or raise target {now}, or lower gate_lr / raise gate_kwargs.init_bias"
        else:
            what = "every gate is on for every validation input: the layer is never pruned"
            advice = f"raise lam or lower target {now}, or lower gate_kwargs.init_bias"
        return (f"CollapseGuard: layer '{layer}' collapsed at epoch {epoch}: {what}, for {self.patience} "
                f"consecutive validation epoch(s). Training stopped; {advice}. Use "
                f"CollapseGuard(fail_on=..., patience=...) (CLI: --guard.fail_on, --guard.patience) to "
                f"change what counts as a failure.")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        """A NaN/inf loss stops training before its gradients reach the weights."""
        if self.check_finite and not torch.isfinite(loss.detach()).all():
            hp = getattr(pl_module, "hparams", {})
            raise GuardError(
                f"CollapseGuard: training loss is {loss.detach().float().item()} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}; training stopped before the update, "
                f"no checkpoint of this state was written. Lower lr (now {hp.get('lr')}) or lam (now "
                f"{hp.get('lam')}), or set trainer.gradient_clip_val.")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint holding NaN/inf weights or buffers."""
        if not self.check_finite:
            return
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise GuardError(f"CollapseGuard: refusing to write a checkpoint with non-finite values in "
                             f"{bad[:5]}{' ...' if len(bad) > 5 else ''} (epoch {trainer.current_epoch}, step "
                             f"{trainer.global_step}). Lower lr or lam, or set trainer.gradient_clip_val.")

    def state_dict(self) -> dict[str, Any]:
        """The streaks, so a resumed run keeps counting where it stopped."""
        return {"streaks": dict(self.streaks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.streaks = dict(state_dict["streaks"])

