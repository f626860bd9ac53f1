"""The granularity seam: *what* a gate decides about (channels of a layer, a whole block, a width),
orthogonal to the gate family (*how* it decides).

A granularity finds its candidate sites in the trace, says why a site is not eligible, attaches a gate
and the hooks that apply its decisions, and says how a decision changes FLOPs: as output-channel masks
(N, C) of some layers (the channel formula dense * keep_in * keep_out then applies) and/or as an
execution factor (N,) of the layers inside it. It may add training terms of its own (``training_terms``,
weighted by the task arguments it names in ``term_weights``). Adding a granularity = one file +
``@register_granularity``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from dynprune.gates import Gate, create_gate
from dynprune.hooks import HookSwitch
from dynprune.registry import Registry
from dynprune.trace import GATE_ATTR, Trace


@dataclass
class Site:
    """One gated decision point of a model.

    Attributes:
        name: module path of the gated module (a layer or a block).
        granularity: registered granularity name.
        units: decisions per input.
        kind: granularity-specific, e.g. ``channel``, ``branch`` (skipped: adds zeros) or ``whole``
            (skipped: passes its input through).
        layers: the traced conv/linear layers whose FLOPs the decision changes directly.
        norm: the BatchNorm after which a channel mask is applied (None: on the layer's output).
        channel_dim: dim of the channels the decision masks (1, or -1 for channels-last Linear).
        family: the gate family deciding here.
        gate_path: module path of the gate.
        widths: the widths a ``width`` site chooses among; expanders: {layer: decisions -> (N, C) prefix mask}.
    """

    name: str
    granularity: str
    units: int
    kind: str
    layers: tuple[str, ...] = ()
    norm: str | None = None
    channel_dim: int = 1
    family: str = ""
    gate_path: str = ""
    widths: list[float] | None = None
    expanders: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)

    def flops_terms(self, mask: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """({layer: output-channel mask (N, C)}, execution factor (N,) of ``layers`` or None)."""
        return GRANULARITIES.get(self.granularity)().flops_terms(self, mask)

    def effective(self, decisions: Tensor) -> Tensor:
        """The decisions (N, units) that take effect (e.g. a width unit only when the narrower ones are on)."""
        return GRANULARITIES.get(self.granularity)().effective(self, decisions)


@dataclass
class TermBatch:
    """What a granularity's training terms may read (see :meth:`Granularity.training_terms`).

    Attributes:
        model: the gated model, after the training forward pass of ``x``.
        x: the batch's inputs (N, ...); y: its labels (N,).
        sites: {site: Site} of this granularity, in call order; gates: {site: its Gate}.
        settings: the task's arguments (a term's weight is the argument named in ``Granularity.term_weights``).
        side_pass: a context for extra forward passes that change neither BatchNorm statistics nor the gates'
            last decisions.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    sites: dict[str, Site]
    gates: dict[str, Gate]
    settings: Mapping[str, Any]
    side_pass: Callable[[], AbstractContextManager[None]]


class Granularity(ABC):
    """One way of gating: candidates, eligibility, hooks, FLOPs terms and extra training terms."""

    name: ClassVar[str]
    term_weights: ClassVar[tuple[str, ...]] = ()
    """Task arguments that weight this granularity's training terms (finite, >= 0; 0 = off)."""

    @abstractmethod
    def candidates(self, trace: Trace) -> list[str]:
        """Every module name ``where`` patterns are matched against, in call order."""

    @abstractmethod
    def ineligible(self, trace: Trace, name: str) -> str | None:
        """Why ``name`` cannot be gated at this granularity (None: it can)."""

    @abstractmethod
    def default(self, trace: Trace, skip_first: bool, skip_last: bool) -> list[str]:
        """The sites gated when ``where`` is not given."""

    @abstractmethod
    def attach(self, model: nn.Module, trace: Trace, name: str, gate: str, gate_kwargs: dict[str, float],
               switch: HookSwitch) -> Site:
        """Add the gate (as ``<name>.dynprune_gate``) and the hooks applying its decisions."""

    @abstractmethod
    def flops_terms(self, site: Site, mask: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """How decisions (N, units) change FLOPs; see :meth:`Site.flops_terms`."""

    def effective(self, site: Site, decisions: Tensor) -> Tensor:
        """The decisions that take effect; every unit acts on its own unless a granularity nests them."""
        return decisions

    def training_terms(self, batch: TermBatch) -> dict[str, Tensor]:
        """This granularity's weighted extra training terms ({name: scalar}); the task calls it after each gated
        training forward pass for every granularity the model has, and adds them to the loss. None by default."""
        return {}


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class ModuleGranularity(Granularity):
    """A granularity that gates whole modules (blocks), not single layers."""

    def candidates(self, trace: Trace) -> list[str]:
        return [n for n in trace.modules if n]

    @staticmethod
    def module_problem(trace: Trace, name: str) -> str | None:
        """Why no module-level gate can sit at ``name`` whatever the granularity (None: it can)."""
        info = trace.modules.get(name)
        if info is None:
            return "it is not a module the forward pass calls"
        if info.calls != 1:
            return f"it is called {info.calls} times per forward pass (a reused module)"
        if not info.in_shape:
            return "it has no tensor input to decide from"
        return None


def add_gate(model: nn.Module, name: str, gate: str, in_channels: int, units: int, gate_kwargs: dict[str, float],
             channel_dim: int = 1) -> tuple[Gate, str]:
    """Create a gate of family ``gate`` for module ``name`` and add it to the model: (gate, its path).

    It becomes the module's child ``dynprune_gate``, unless the module is a container that runs every
    child (``nn.Sequential``): then it is a child ``dynprune_gate__<path>`` of the nearest ancestor
    that is not a container.
    """
    net = create_gate(gate, in_channels, units, channel_dim=channel_dim, **gate_kwargs)
    net.to(next(model.parameters()).device)
    parts = name.split(".")
    for depth in range(len(parts), -1, -1):
        owner_path = ".".join(parts[:depth])
        owner = model.get_submodule(owner_path)
        if not isinstance(owner, CONTAINERS):
            break
    else:
        raise ValueError(f"cannot gate '{name}': it and every module around it are containers "
                         "(nn.Sequential/ModuleList/ModuleDict) that would run the gate as a layer")
    child = GATE_ATTR if depth == len(parts) else f"{GATE_ATTR}__{'__'.join(parts[depth:])}"
    if hasattr(owner, child):
        raise ValueError(f"module '{name}' already has a gate")
    owner.add_module(child, net)
    return net, ".".join(p for p in (owner_path, child) if p)


def layers_inside(trace: Trace, name: str) -> tuple[str, ...]:
    """Traced conv/linear layers at or below module path ``name``."""
    return tuple(n for n in trace.layers if n == name or n.startswith(name + "."))


GRANULARITIES: Registry[Granularity] = Registry("granularity")
register_granularity = GRANULARITIES.register


def list_granularities() -> list[str]:
    """Names of every registered granularity."""
    return GRANULARITIES.names()


def resolve(names: str | Sequence[str]) -> list[str]:
    """Validate one granularity name or a list of them (unknown names raise, naming the valid ones)."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        GRANULARITIES.get(n)
    return names
