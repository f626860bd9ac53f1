"""CollapseGuard: stop a run whose gates have collapsed or whose loss is no longer finite.

Failures are raised as :class:`GuardError` (a RuntimeError), so a CLI run exits non-zero with the
message and a sweep can record the point as failed. The exception is raised before any checkpoint
of the bad state is written: a NaN/inf loss is caught before its backward pass (the weights are
still those of the last good step), a collapse at the end of the validation epoch (before
ModelCheckpoint saves), and ``on_save_checkpoint`` refuses to write non-finite weights however
they arose.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

FAIL_ON = ("off", "on", "both", "none")


class GuardError(RuntimeError):
    """A run stopped by :class:`CollapseGuard`; the message says what happened and what to change."""


class CollapseGuard(L.Callback):
    """Stops training when a layer's gates collapse or the training loss becomes NaN/inf.

    A layer has collapsed "off" when every channel is off for every validation input, "on" when
    every channel is on for every input (the gate never prunes). A layer inside a residual branch
    (``model.dynprune.bypassed``, e.g. a ResNet block's conv1) that is always off only skips its
    block, which is a legitimate outcome, so it never counts as "off". Either must persist for
    ``patience`` consecutive validation epochs (sanity checks excluded).

    Args:
        patience: consecutive validation epochs a collapse must last to stop the run.
        fail_on: which collapse stops the run: ``off`` (default; a dead layer), ``on``, ``both``
            or ``none`` (only the NaN/inf check).
        check_finite: stop on a NaN/inf training loss and refuse to checkpoint non-finite weights.
    """

    def __init__(self, patience: int = 3, fail_on: str = "off", check_finite: bool = True) -> None:
        super().__init__()
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if fail_on not in FAIL_ON:
            raise ValueError(f"unknown fail_on '{fail_on}'; choose one of: {', '.join(FAIL_ON)}")
        self.patience, self.fail_on, self.check_finite = patience, fail_on, check_finite
        self.streaks: dict[str, int] = {}
        self._lo: dict[str, Tensor] = {}
        self._hi: dict[str, Tensor] = {}

    def _kinds(self) -> tuple[str, ...]:
        return {"off": ("off",), "on": ("on",), "both": ("off", "on"), "none": ()}[self.fail_on]

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._lo, self._hi = {}, {}

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Track each layer's lowest and highest per-input keep fraction over the epoch."""
        if trainer.sanity_checking or not self._kinds():
            return
        if not isinstance(outputs, dict) or "keep" not in outputs:
            raise TypeError("CollapseGuard needs a module whose validation step returns {'keep': "
                            "{layer: (N,) kept fraction}} (e.g. dynprune.GatedClassifier)")
        for name, keep in outputs["keep"].items():
            lo, hi = keep.detach().min(), keep.detach().max()
            self._lo[name] = torch.minimum(self._lo[name], lo) if name in self._lo else lo
            self._hi[name] = torch.maximum(self._hi[name], hi) if name in self._hi else hi

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Update the per-layer streaks and raise once one reaches ``patience``."""
        if trainer.sanity_checking or not self._lo:
            return
        names = list(self._lo)
        lo, hi = torch.stack([self._lo[n] for n in names]), torch.stack([self._hi[n] for n in names])
        if trainer.world_size > 1:  # every rank must see the same verdict
            lo = pl_module.all_gather(lo).reshape(-1, len(names)).amin(dim=0)
            hi = pl_module.all_gather(hi).reshape(-1, len(names)).amax(dim=0)
        state = {"off": hi == 0, "on": lo == 1}
        info = getattr(getattr(pl_module, "model", None), "dynprune", None)
        bypassed = set(getattr(info, "bypassed", ()))
        for kind in self._kinds():
            for name, collapsed in zip(names, state[kind].tolist(), strict=True):
                collapsed = collapsed and not (kind == "off" and name in bypassed)
                key = f"{kind}:{name}"
                self.streaks[key] = self.streaks.get(key, 0) + 1 if collapsed else 0
                if self.streaks[key] >= self.patience:
                    raise GuardError(self._collapse_message(pl_module, name, kind, trainer.current_epoch))

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

