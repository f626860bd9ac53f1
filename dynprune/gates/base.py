"""The Gate contract: a small SE-style network G mapping the input of what it gates to decisions.

M(x) = sigma(G(x)) with G = global-avg-pool -> fc -> ReLU -> fc. A gate family (one subclass per
file) owns how probabilities become the applied decisions while training (hard straight-through,
soft, sampled, relaxed), any extra training term it contributes (e.g. the REINFORCE surrogate, which
may ask the task for a hard rollout of the batch) with the state that term needs, and the training
phases it needs (``phases``). At inference every family decides hard by a threshold on G(x):
``1[G(x) >= t]``, where the family declares ``t`` (``inference_threshold``; 0 by default, the 0.5 point of the
sigmoid), so the compiled runtime compares the pre-activation directly, with no sigmoid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

MODES = ("train", "hard", "finetune")


class Rollout(NamedTuple):
    """The same batch run again with every gate deciding hard (as at inference), in a pass that leaves no trace."""

    task_loss: Tensor
    """(N,) per-input task loss."""
    site_costs: dict[str, Tensor]
    """{site: its own cost (N,)}."""
    cost: Tensor
    """(N,) total cost per input."""


@dataclass
class GateContext:
    """What a gate family may use to build its own training term, per input of the batch.

    Attributes:
        task_loss: (N,) per-input task loss (detached).
        site_cost: (N,) this gate's own share of the cost (its layers' effective FLOPs / dense FLOPs).
        rollout: the task's hard-rollout service: the same inputs with every gate deciding hard, computed once
            per step on first use (e.g. a self-critical baseline); families that do not call it cost nothing.
        progress: fraction of training done, in [0, 1].
        name: this gate's site.
        price: ``price(mean_cost=None)``: what one unit of cost is worth to the objective (the derivative of its
            penalty, detached, a scalar) at this batch's mean cost, or at another batch-mean cost (e.g. the
            rollout's, which is what inference runs).
    """

    task_loss: Tensor
    site_cost: Tensor
    rollout: Callable[[], Rollout]
    progress: float
    name: str
    price: Callable[..., Tensor]


class Gate(nn.Module, ABC):
    """Maps an input (N, C_in, ...) (channels on ``channel_dim``) to decisions (N, units) in [0, 1], or to
    (N, T, units) with ``per_position`` (one decision per position, e.g. per token of (N, T, D)).

    Args:
        in_channels: channels of the gated module's input.
        units: decisions per input (a layer's output channels, 1 for a block, ...).
        reduction: hidden width is ``max(min_hidden, in_channels // reduction)``.
        init_bias: initial bias of the last fc; 3.0 means every gate starts ~95% open.
        min_hidden: smallest hidden width of G.
        channel_dim: dimension of the input that holds channels (1, or -1 for channels-last).
        per_position: decide for every position (the dims other than batch and channels, flattened) instead
            of pooling them.
    """

    phases: ClassVar[tuple[str, ...]] = ()
    """Training phases the family needs besides training with its own decisions, by name (see
    :mod:`dynprune.phases`): a family whose training decisions differ in kind from inference's (soft masks)
    declares ``("bn_recalibration", "hard_finetune")``. The task runs them without knowing the family."""

    transient: ClassVar[tuple[str, ...]] = ("probs", "scores", "mask")
    """Attributes that hold the last forward pass (possibly inside an autograd graph): dropped when the gate is
    copied or pickled, so a model can be deep-copied (compiled, frozen as a teacher) right after a training step."""

    def __getstate__(self) -> dict[str, object]:
        """The gate's state without the last forward pass's tensors (see :attr:`transient`)."""
        state = dict(self.__dict__)
        state.update(dict.fromkeys(self.transient))
        return state

    def __init__(
        self, in_channels: int, units: int, reduction: int = 4, init_bias: float = 3.0,
        min_hidden: int = 8, channel_dim: int = 1, per_position: bool = False,
    ) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"gate reduction must be >= 1, got {reduction}")
        hidden = max(min_hidden, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, units)
        nn.init.constant_(self.fc2.bias, init_bias)
        self.channel_dim, self.per_position = channel_dim, per_position
        self.mode: str | None = None
        self.forced: Tensor | None = None
        self.probs: Tensor | None = None
        self.scores: Tensor | None = None
        self.mask: Tensor | None = None

    def set_mode(self, mode: str | None) -> Gate:
        """``"train"``: the family's training decisions; ``"hard"``: deterministic 1[G(x) >= 0];
        ``"finetune"``: the hard decisions in the forward pass with the gradient of sigma(G(x)) (straight
        through), so a soft family can train with its inference masks and still move its gates;
        None: follow ``self.training``. Lets BatchNorm train while the gates decide hard."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown gate mode '{mode}'; choose one of: {', '.join(MODES)} (or None)")
        self.mode = mode
        return self

    def force(self, decisions: Tensor | None) -> Gate:
        """Override the decisions with a fixed (N, units) or (units,) mask, or (N, T, units) per position (None:
        back to G(x)); a per-position gate applies an (N, units) mask to every position of input n. A mask of
        another number of units is a ValueError here, not a broadcast error in a later forward."""
        units = self.fc2.out_features
        if decisions is not None and (decisions.dim() == 0 or decisions.shape[-1] != units):
            raise ValueError(f"force: mask of shape {tuple(decisions.shape)} for a gate of {units} units; "
                             f"expected ({units},) or (N, {units})")
        self.forced = decisions
        return self

    @property
    def hard(self) -> bool:
        """Whether this forward pass uses deterministic decisions."""
        return self.mode == "hard" or (self.mode is None and not self.training)

    def pool(self, x: Tensor) -> Tensor:
        """Global average pool of every dim except batch and channels: -> (N, C_in); with ``per_position``
        the positions are kept instead: -> (N, T, C_in)."""
        if x.dim() <= 2:
            return x
        x = x.movedim(self.channel_dim, -1).flatten(1, -2)
        return x if self.per_position else x.mean(1)

    def logits(self, x: Tensor) -> Tensor:
        """G(x): (N, C_in, ...) -> (N, units) (or (N, T, units) per position) pre-sigmoid scores."""
        return self.fc2(self.fc1(self.pool(x)).relu())

    def forward(self, x: Tensor) -> Tensor:
        """Decisions (N, units) for input x; kept as ``self.mask`` (and ``self.probs``, ``self.scores`` = G(x))
        for losses."""
        logits = self.logits(x)
        self.scores, self.probs = logits, logits.sigmoid()
        if self.forced is not None:
            forced = self.forced
            if forced.dim() == 2 and logits.dim() == 3:  # per input (N, units): the same for every position
                forced = forced[:, None]
            mask = forced.to(logits.dtype).expand_as(logits)
        elif self.mode == "finetune":
            mask = self.hard_decisions(logits) + (self.probs - self.probs.detach())  # exactly the hard values
        elif self.hard:
            mask = self.hard_decisions(logits)
        else:
            mask = self.train_decisions(logits)
        self.mask = mask
        return mask

    def inference_threshold(self) -> float:
        """t of the inference rule 1[G(x) >= t]: 0, i.e. sigma(G(x)) >= 0.5 (a family whose rule thresholds
        another monotone function of G(x) returns the threshold moved back onto G(x))."""
        return 0.0

    def hard_decisions(self, logits: Tensor) -> Tensor:
        """Deterministic decisions at inference: 1[G(x) >= t], t = :meth:`inference_threshold`."""
        return (logits >= self.inference_threshold()).to(logits.dtype)

    @abstractmethod
    def train_decisions(self, logits: Tensor) -> Tensor:
        """The family's decisions while training, from G(x) (N, units); gradients reach G here."""

    def training_loss(self, ctx: GateContext) -> Tensor | None:
        """The family's own extra training term (e.g. a REINFORCE surrogate); None if it has none."""
        return None


class StraightThrough(torch.autograd.Function):
    """Forward: exactly 1[p >= 0.5]; backward: the gradient passes to p unchanged."""

    @staticmethod
    def forward(ctx: object, probs: Tensor) -> Tensor:
        return (probs >= 0.5).to(probs.dtype)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad
