"""The granularity seam: *what* a gate decides about (channels of a layer, a whole block, a width),
orthogonal to the gate family (*how* it decides).

A granularity is one file holding everything about it: it finds its candidate sites in the trace and
says why a site is not eligible (and which gate families it refuses: ``refuses_gate``), attaches a gate
and the hooks that apply its decisions, says how decisions change FLOPs (:class:`FlopsTerms`), whether
closing every unit skips work or cuts the network, what it adds to the FLOPs report, its extra training
terms (``training_terms``, weighted by the task arguments it names in ``term_weights``), its options
(constructor arguments, e.g. ``widths``) and the runtime executor that runs it for real
(:class:`dynprune.runtime.executor.Executor`, None: not compilable).
Adding a granularity = one subclass + ``@register_granularity``; no code elsewhere names it.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from dynprune.gates import Gate, create_gate
from dynprune.hooks import HookSwitch
from dynprune.registry import Registry
from dynprune.trace import GATE_ATTR, LayerInfo, Trace

if TYPE_CHECKING:
    from dynprune.runtime.executor import Executor


@dataclass(frozen=True)
class Layout:
    """How a gated module's input (N, ...) is laid out, so a gate pools it to (N, C_in) features, or to
    (N, T, C_in) with ``per_position`` (one decision per position: decisions (N, T, units)).

    Attributes:
        name: ``image`` (N, C, H, W), ``tokens`` (N, T, D) or ``vector`` (N, D).
        channel_dim: the dim of the input (batch dim included) that holds the features.
        per_position: decide per position (token) instead of once per input.
    """

    name: str
    channel_dim: int
    per_position: bool = False

    def features(self, shape: Sequence[int]) -> int:
        """Feature count of one input of ``shape`` (batch dim excluded)."""
        return shape[self.channel_dim - 1 if self.channel_dim > 0 else self.channel_dim]


LAYOUTS = {"image": Layout("image", 1), "tokens": Layout("tokens", -1), "vector": Layout("vector", -1)}
_BY_RANK = {3: "image", 2: "tokens", 1: "vector"}


def layout_of(shape: Sequence[int], name: str | None = None, per_position: bool = False) -> Layout:
    """The layout ``name`` (default: from the rank of one input's ``shape``: (C, H, W) image, (T, D) tokens,
    (D,) vector), deciding per position if asked (only where there are positions)."""
    if name is None:
        if len(shape) not in _BY_RANK:
            raise ValueError(f"cannot tell the layout of an input of shape {tuple(shape)}; name it: one of "
                             f"{', '.join(LAYOUTS)}")
        name = _BY_RANK[len(shape)]
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout '{name}'; choose one of: {', '.join(LAYOUTS)}")
    if per_position and name == "vector":
        raise ValueError("per_position decisions need positions: a 'vector' input (N, D) has none")
    return Layout(name, LAYOUTS[name].channel_dim, per_position)


@dataclass
class FlopsTerms:
    """How one site's decisions change FLOPs, per input (see :class:`dynprune.flops.FlopsProfile`).

    Attributes:
        masks: {layer: kept output channels (N, C), or (N, T, C) per position}; the channel formula
            dense * keep_in * keep_out then applies to the layer and to the layer reading it.
        scale: {module path: factor (N,)} multiplying that module's effective FLOPs: any function of the
            decisions (a block's execution 0/1, the square of a kept-token fraction for attention scores).
            A module that is not a traced conv/linear layer contributes its own FLOPs (its conv/linear
            layers excluded), taken out of the ungated rest.
    """

    masks: dict[str, Tensor] = field(default_factory=dict)
    scale: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Site:
    """One gated decision point of a model; granularities add their own fields in a subclass.

    Attributes:
        name: module path of the gated module (a layer or a block).
        owner: the granularity (instance, with its options) that made the site.
        units: decisions per input (per position with a per-position layout).
        layers: the traced conv/linear layers whose FLOPs the decisions change directly.
        layout: how the gate reads the module's input.
        family: the gate family deciding here.
        gate_path: module path of the gate.
    """

    name: str
    owner: Granularity
    units: int
    layers: tuple[str, ...] = ()
    layout: Layout = LAYOUTS["image"]
    family: str = ""
    gate_path: str = ""

    @property
    def granularity(self) -> str:
        """Registered name of the site's granularity."""
        return self.owner.name

    def flops_terms(self, mask: Tensor) -> FlopsTerms:
        """How decisions (N, units) change FLOPs: see :class:`FlopsTerms`."""
        return self.owner.flops_terms(self, mask)

    def effective(self, decisions: Tensor) -> Tensor:
        """The decisions (N, units) that take effect (e.g. a width unit only when the narrower ones are on)."""
        return self.owner.effective(self, decisions)

    def gate_reads(self, masks: dict[str, Tensor]) -> Tensor | None:
        """The fraction of its input (N,) the site's gate reads, given every site's decisions (None: all of it)."""
        return self.owner.gate_reads(self, masks)


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
    """One way of gating: candidates, eligibility, hooks, FLOPs terms, report section, extra training terms, executor.

    Options are constructor keyword arguments (e.g. ``WidthGranularity(widths=[0.5, 1.0])``).
    """

    name: ClassVar[str]
    executor: ClassVar[Executor | None] = None
    """How ``compile_for_inference`` runs this granularity's sites (None: it refuses, naming the granularity)."""
    report_title: ClassVar[str] = ""
    """Title of this granularity's section of the FLOPs report ("": no section, see :meth:`report`)."""
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
    def flops_terms(self, site: Site, mask: Tensor) -> FlopsTerms:
        """How decisions (N, units) change FLOPs; see :class:`FlopsTerms`."""

    def refuses_gate(self, gate: str) -> str | None:
        """Why gate family ``gate`` cannot decide at this granularity (None: it can); checked before tracing."""
        return None

    def effective(self, site: Site, decisions: Tensor) -> Tensor:
        """The decisions that take effect; every unit acts on its own unless a granularity nests them."""
        return decisions

    def gate_reads(self, site: Site, masks: dict[str, Tensor]) -> Tensor | None:
        """The fraction of its input (N,) the site's gate reads, from the decisions of every site ``masks``
        (e.g. only the tokens an earlier site kept); None (the default): all of it."""
        return None

    def skips_when_closed(self, site: Site, layers: dict[str, LayerInfo]) -> bool:
        """Whether every unit off skips work (a residual branch, a block, a narrowest width) instead of
        cutting the network (what :class:`dynprune.guard.CollapseGuard` calls a dead layer)."""
        return False

    def report(self, site: Site, decisions: Tensor) -> dict[str, float]:
        """This site's row of the report section ``report_title``: {label: share of inputs}, from the hard
        decisions (N, units) of an epoch ({}: no row)."""
        return {}

    @classmethod
    def options(cls) -> list[str]:
        """Names of the options this granularity takes."""
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]

    def training_terms(self, batch: TermBatch) -> dict[str, Tensor]:
        """This granularity's weighted extra training terms ({name: scalar}); the task calls it after each gated
        training forward pass for every granularity the model has, and adds them to the loss. None by default."""
        return {}


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class ModuleGranularity(Granularity):
    """A granularity that gates whole modules (blocks), not single layers.

    Args:
        layout: how the gate reads the module's input (``image``, ``tokens``, ``vector``; default: from its rank).
    """

    def __init__(self, layout: str | None = None) -> None:
        self.layout = layout

    def candidates(self, trace: Trace) -> list[str]:
        return [n for n in trace.modules if n]

    def input_layout(self, trace: Trace, name: str) -> Layout:
        """The layout of module ``name``'s input."""
        return layout_of(trace.modules[name].in_shape, self.layout)

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
             layout: Layout = LAYOUTS["image"]) -> tuple[Gate, str]:
    """Create a gate of family ``gate`` for module ``name`` and add it to the model: (gate, its path).

    It becomes the module's child ``dynprune_gate``, unless the module is a container that runs every
    child (``nn.Sequential``): then it is a child ``dynprune_gate__<path>`` of the nearest ancestor
    that is not a container.
    """
    position = {"per_position": True} if layout.per_position else {}
    net = create_gate(gate, in_channels, units, channel_dim=layout.channel_dim, **position, **gate_kwargs)
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


def report_sections(sites: Mapping[str, Site], masks: Mapping[str, Tensor]) -> dict[str, dict[str, dict[str, float]]]:
    """{section title: {site: {label: share of inputs}}} from each site's granularity (:meth:`Granularity.report`),
    given the hard decisions (N, units) of an epoch per site; {} when no site reports anything."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, site in sites.items():
        if name in masks and site.owner.report_title and (row := site.owner.report(site, masks[name])):
            out.setdefault(site.owner.report_title, {})[name] = row
    return out


GRANULARITIES: Registry[Granularity] = Registry("granularity")
register_granularity = GRANULARITIES.register


def list_granularities() -> list[str]:
    """Names of every registered granularity."""
    return GRANULARITIES.names()


def create_granularity(name: str, **options: Any) -> Granularity:
    """The granularity ``name`` with ``options`` (an unknown option raises, naming the allowed ones)."""
    cls = GRANULARITIES.get(name)
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        allowed = ", ".join(cls.options()) or "none"
        raise ValueError(f"granularity '{name}' has no option(s) {unknown}; its options: {allowed}")
    return cls(**options)


def resolve(spec: str | Granularity | Sequence[str] | Mapping[str, Mapping[str, Any] | None]) -> dict[str, Granularity]:
    """{name: granularity} from one name, a list of names, or {name: {option: value}} (e.g.
    ``{"width": {"widths": [0.5, 1.0]}}``); unknown names or options raise, naming the valid ones."""
    if isinstance(spec, Granularity):
        return {spec.name: spec}
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Mapping):
        return {n: create_granularity(n, **(opts or {})) for n, opts in spec.items()}
    return {n: create_granularity(n) for n in spec}
