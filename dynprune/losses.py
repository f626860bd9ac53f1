"""Training terms for gated networks: batch shaping, distillation, per-layer budget, FLOPs target."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from scipy.special import betainc
from torch import Tensor

_PDF_EPS = 1e-4  # the Beta pdf is infinite at 0 or 1 when alpha or beta < 1: its gradient uses x clamped to this


def beta_pdf(x: Tensor, alpha: float, beta: float) -> Tensor:
    """The Beta(alpha, beta) density at ``x`` (any shape), evaluated at x clamped into [1e-4, 1 - 1e-4]."""
    x = x.clamp(_PDF_EPS, 1.0 - _PDF_EPS)
    log_norm = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    return torch.exp((alpha - 1.0) * torch.log(x) + (beta - 1.0) * torch.log1p(-x) - log_norm)


class _BetaCDF(torch.autograd.Function):
    """The Beta CDF (regularized incomplete beta function) of x in [0, 1]; differentiable in x only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float, beta: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.alpha, ctx.beta = alpha, beta
        cdf = betainc(alpha, beta, x.detach().cpu().double().numpy())
        return torch.as_tensor(cdf, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return grad * beta_pdf(x, ctx.alpha, ctx.beta), None, None


def beta_cdf(x: Tensor, alpha: float, beta: float) -> Tensor:
    """Beta(alpha, beta) CDF of ``x`` (any shape, values in [0, 1]), with the Beta pdf as its gradient."""
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"Beta parameters must be positive; got alpha={alpha}, beta={beta}")
    return _BetaCDF.apply(x, alpha, beta)


def batch_shaping_loss(probs: Tensor, alpha: float = 0.6, beta: float = 0.4) -> Tensor:
    """Batch-shaping loss (Bejnordi et al., ICLR 2020) of gate probabilities (N, U).

    Per unit (column), the batch's probabilities are sorted and compared with a Beta(alpha, beta)
    prior by the Cramér-von Mises distance: the mean over the batch of (i / (N + 1) - F(p_(i)))^2,
    with i / (N + 1) the empirical CDF at the i-th smallest probability and F the prior CDF. The
    loss is the mean over units. The default prior is U-shaped, so a gate is pushed to be on for
    some inputs and off for others rather than the same for all.
    """
    if probs.ndim != 2 or probs.shape[0] < 2:
        raise ValueError(f"probs must be (N, U) with N >= 2; got shape {tuple(probs.shape)}")
    n = probs.shape[0]
    ordered, _ = probs.sort(dim=0)
    ecdf = torch.arange(1, n + 1, dtype=probs.dtype, device=probs.device).unsqueeze(1) / (n + 1)
    return (ecdf - beta_cdf(ordered, alpha, beta)).square().mean()


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton distillation: T^2 * KL(teacher || student) of the temperature-softened (N, K) logits, batch mean.

    The teacher is detached (a frozen dense model); the T^2 factor keeps gradient sizes comparable
    across temperatures.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive; got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def logit_penalty(scores: Tensor) -> Tensor:
    """Mean squared gate score G(x) (any shape): keeps a gate's scores near its decision boundary 0, where
    the features of each input can still flip its decision, instead of saturating to one decision for all."""
    return scores.square().mean()


def budget_bounds(progress: float, target: float, anneal: float = 1 / 3, width: float = 0.1) -> tuple[float, float]:
    """Per-layer keep-rate bounds (lb, ub) at training ``progress`` in [0, 1] (DGNet-style).

    The bounds are (0, 1) at progress 0 and move linearly to (max(0, target - width),
    min(1, target + width)), reached at progress ``anneal`` and kept from then on.
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target keep rate must be in [0, 1]; got {target}")
    if progress < 0 or anneal < 0 or width < 0:
        raise ValueError(f"progress, anneal and width must be >= 0; got {progress}, {anneal}, {width}")
    t = 1.0 if progress >= anneal else progress / anneal
    lb, ub = max(0.0, target - width), min(1.0, target + width)
    return t * lb, 1.0 - t * (1.0 - ub)


def budget_loss(keep: Tensor, lb: float, ub: float) -> Tensor:
    """Squared hinge of per-site batch keep rates (S,) outside [lb, ub], mean over sites; 0 inside."""
    if lb > ub:
        raise ValueError(f"budget bounds lb={lb} > ub={ub}")
    return (F.relu(lb - keep).square() + F.relu(keep - ub).square()).mean()


_PENALTIES: dict[str, Callable[[Tensor], Tensor]] = {"abs": torch.abs, "squared": torch.square}


def target_penalty(ratio: Tensor, target: float, kind: str = "abs") -> Tensor:
    """Distance of FLOPs ratios (any shape, e.g. per input (N,) or a batch mean) from ``target``, elementwise.

    ``kind`` "abs" gives |ratio - target|, "squared" gives (ratio - target)^2.
    """
    if kind not in _PENALTIES:
        raise ValueError(f"unknown target penalty '{kind}'; choose one of: {', '.join(_PENALTIES)}")
    return _PENALTIES[kind](ratio - target)
