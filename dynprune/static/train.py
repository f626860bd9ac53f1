"""A plain supervised training / evaluation loop shared by the static baselines and Deep Compression.

Kept deliberately small: pruning and compression need to fine-tune a model that carries
``torch.nn.utils.prune`` masks or parametrizations, which any optimizer over ``model.parameters()``
handles, so there is nothing gate-specific here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

OPTIMIZERS = ("adam", "sgd")


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    cosine: bool = True,
) -> list[float]:
    """Train ``model`` with cross-entropy for ``epochs`` over ``loader`` of ((N, ...) inputs, (N,) labels).

    Only parameters with ``requires_grad`` are optimized; ``cosine`` anneals the learning rate to 0
    per step. Batches go to the model's device. Returns the mean training loss of each epoch; the
    model is left in eval mode.
    """
    if epochs < 0 or lr <= 0:
        raise ValueError(f"epochs must be >= 0 and lr > 0, got epochs={epochs}, lr={lr}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr, weight_decay=weight_decay)
    steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)) if cosine else 1.0
    )
    device = next(model.parameters()).device
    losses = []
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item() * len(y), count + len(y)
        losses.append(total / max(1, count))
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) over ``loader``."""
    model.eval()
    device = next(model.parameters()).device
    correct, count = 0, 0
    for x, y in loader:
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        count += len(y)
    if count == 0:
        raise ValueError("evaluate() got an empty loader")
    return correct / count
