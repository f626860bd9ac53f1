"""CharLM: a LightningModule training a registered language model on next-character prediction.

The loss is the natural-log cross-entropy of every next character, so ``train/loss``, ``val/loss`` and
``test/loss`` are in nats per character (``*/bpc`` gives bits per character). AdamW with weight decay on matrices
and embeddings only, linear warm-up then cosine decay per step (nanoGPT's recipe). With ``gate``, the model is gated
(:func:`dynprune.gate_model`, e.g. per-token neuron gates) and trained with loss + ``lam`` x cost, the cost being the
batch-mean FLOPs ratio of a window (or its squared distance to ``target``); eval steps report per-window FLOPs and
the decisions to :class:`dynprune.FlopsCallback`.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynprune import backbones
from dynprune.checks import check_number
from dynprune.flops import FlopsProfile
from dynprune.inject import collect_masks, gate_model, gating_info
from dynprune.trace import trace_layers


class CharLM(L.LightningModule):
    """A language model (N, T) ids -> (N, T, vocab) logits, trained on (x, y) batches of the TextDataModule.

    Args:
        backbone: a registered language model name (``dynprune.backbones.list_language_models()``) or an nn.Module.
        vocab_size: ids the model predicts; must equal the data's ``vocab_size``.
        block_size: the model's context; must equal the data's ``block_size``.
        model_kwargs: options of the language model (e.g. ``{"dim": 256, "depth": 6, "heads": 8}``).
        lr: peak learning rate; ``min_lr`` is where the cosine ends.
        weight_decay: AdamW weight decay of matrices and embeddings (not biases or norms).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps before the cosine.
        gate: a gate family to gate the model with (None: dense); ``granularity`` and ``gate_kwargs`` as in
            :func:`dynprune.gate_model` (default: per-token ``neuron`` gates over every MLP).
        lam: weight of the cost (>= 0); ``target``: a FLOPs ratio in (0, 1] the cost pulls the batch mean to.
    """

    def __init__(self, backbone: str | nn.Module = "char_gpt", vocab_size: int = 65, block_size: int = 256,
                 model_kwargs: dict[str, Any] | None = None, lr: float = 1e-3, min_lr: float = 1e-4,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.99), warmup_steps: int = 100,
                 gate: str | None = None, granularity: str | dict[str, Any] = "neuron",
                 gate_kwargs: dict[str, float] | None = None, lam: float = 0.0, target: float | None = None) -> None:
        super().__init__()
        if not 0 <= min_lr <= lr or warmup_steps < 0 or weight_decay < 0:
            raise ValueError(f"need 0 <= min_lr <= lr, warmup_steps >= 0 and weight_decay >= 0; got min_lr={min_lr}, "
                             f"lr={lr}, warmup_steps={warmup_steps}, weight_decay={weight_decay}")
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if isinstance(backbone, str):
            backbone = backbones.create_language_model(backbone, vocab_size, block_size, **(model_kwargs or {}))
        elif model_kwargs:
            raise ValueError("model_kwargs configure a language model built by name; the given module is built")
        self.model = backbone
        check_number("lam", lam, 0)
        if target is not None and not 0 < target <= 1:
            raise ValueError(f"target must be a FLOPs ratio in (0, 1], got {target}")
        if gate is None and (lam or target is not None or gate_kwargs):
            raise ValueError("lam, target and gate_kwargs need a gate (gate=None trains the dense model)")
        if gate is not None:
            example = torch.zeros(1, block_size, dtype=torch.long, device=next(backbone.parameters()).device)
            gate_model(backbone, gate, granularity, example=example, **(gate_kwargs or {}))
        self.profile = gating_info(backbone).flops if gate is not None else self._dense_profile(block_size)
        self.example_input_array = torch.zeros(1, block_size, dtype=torch.long)  # model summary: sizes and FLOPs

    def _dense_profile(self, block_size: int) -> FlopsProfile:
        """Dense FLOPs of one full window of ids (1, block_size), per traced layer (FLOPs = 2 x MACs)."""
        ids = torch.zeros(1, block_size, dtype=torch.long, device=next(self.model.parameters()).device)
        return FlopsProfile.build(self.model, ids, trace_layers(self.model, ids))

    def setup(self, stage: str) -> None:
        """The data's vocabulary and window must be the model's."""
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        for attr in ("vocab_size", "block_size"):
            value = getattr(data, attr, None)
            if value is not None and value != self.hparams[attr]:
                raise ValueError(f"the data has {attr}={value} but the model has {attr}={self.hparams[attr]}; "
                                 f"set model.{attr}={value}")

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids (N, T) -> logits (N, T, vocab_size)."""
        return self.model(idx)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean next-character cross-entropy of a batch (x, y) of ids (N, T), in nats per character."""
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        if self.hparams.gate is None:
            return loss
        cost = self.profile.ratio(collect_masks(self.model)).mean()
        target = self.hparams.target
        self.log("train/flops_ratio", cost, on_step=True, on_epoch=True, prog_bar=True)
        return loss + self.hparams.lam * (cost if target is None else (cost - target) ** 2)

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> dict[str, Any]:
        """Log the loss (nats/char) and return the per-window FLOPs (and decisions) the FlopsCallback reports."""
        loss = self.loss(batch)
        self.log_dict({f"{stage}/loss": loss, f"{stage}/bpc": loss / math.log(2)}, prog_bar=True, on_epoch=True,
                      sync_dist=True, batch_size=batch[1].numel())
        if self.hparams.gate is None:
            flops = torch.full((len(batch[0]),), float(self.profile.dense_total), device=loss.device)
            return {"loss": loss, "flops": flops, "keep": {}, "layer_flops": {}}
        masks = {n: m.detach() for n, m in collect_masks(self.model).items()}
        layer_flops = self.profile.per_layer(masks)
        return {"loss": loss, "flops": self.profile.total(layer_flops), "keep": {}, "layer_flops": layer_flops,
                "masks": masks}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (decay on parameters with >= 2 dims) with warm-up + cosine from ``lr`` to ``min_lr`` per step."""
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if not math.isfinite(total) or total <= hp.warmup_steps:
                return 1.0
            done = min(1.0, (step - hp.warmup_steps) / (total - hp.warmup_steps))
            return (hp.min_lr + 0.5 * (hp.lr - hp.min_lr) * (1 + math.cos(math.pi * done))) / hp.lr

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
