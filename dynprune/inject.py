"""``gate_model``: add gates to ANY nn.Module without editing its source, at any granularity.

The model is traced once on an example input (float zeros of ``input_shape``, or any example such as
integer token ids) (:mod:`dynprune.trace`); the granularity (:mod:`dynprune.granularity`, a name or an
instance carrying its options) picks the eligible sites, attaches a gate to each (a child module named
``dynprune_gate``) and the forward hooks that apply its decisions, and says how they change FLOPs. This
file knows no granularity by name. Gated modules keep their type, attributes and ``state_dict`` keys.
A model may be gated at several granularities (e.g. block gates outside, channel gates inside).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dynprune.flops import FlopsProfile, count_flops, example_input
from dynprune.gates import Gate
from dynprune.granularity import Granularity, Site, resolve
from dynprune.hooks import HookSwitch
from dynprune.trace import LayerInfo, ModuleInfo, Trace, trace_model


@dataclass
class GatingInfo:
    """What ``gate_model`` did; stored on the model as ``model.dynprune``."""

    sites: dict[str, Site]
    layers: dict[str, LayerInfo]
    modules: dict[str, ModuleInfo]
    flops: FlopsProfile
    switch: HookSwitch
    bypassed: list[str] = field(default_factory=list)
    """Sites whose every unit off skips work (a residual branch, a block) instead of cutting the network."""
    skipped: dict[str, str] = field(default_factory=dict)
    example: Tensor | None = None
    """The example input (1, ...) the model was traced and counted with."""

    @property
    def gated(self) -> list[str]:
        """Names of the gated sites (modules), in call order."""
        return list(self.sites)

    @property
    def granularities(self) -> list[str]:
        """The granularities this model is gated at."""
        return sorted({s.granularity for s in self.sites.values()})

    @property
    def gate(self) -> str:
        """The gate family (or families, joined by '+')."""
        return "+".join(sorted({s.family for s in self.sites.values()}))


def _select(gran: Granularity, trace: Trace, where: Sequence[str] | None, skip_first: bool,
            skip_last: bool) -> tuple[list[str], dict[str, str]]:
    """(site names to gate, {name: why not} for the candidates left out)."""
    skipped: dict[str, str] = {}
    if where is None:
        names = gran.default(trace, skip_first, skip_last)
    else:
        candidates = gran.candidates(trace)
        unmatched = [p for p in where if not any(fnmatch.fnmatchcase(c, p) for c in candidates)]
        if unmatched:
            shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
            raise ValueError(f"where pattern(s) {unmatched} match no module that granularity '{gran.name}' "
                             f"can gate; candidates: {shown}")
        for pattern in where:  # an exact name must be gateable; a wildcard skips what is not
            if pattern in candidates and (reason := gran.ineligible(trace, pattern)):
                raise ValueError(f"cannot gate '{pattern}' at granularity '{gran.name}': {reason}")
        names = [c for c in candidates if any(fnmatch.fnmatchcase(c, p) for p in where)]
    chosen = []
    for name in names:
        reason = gran.ineligible(trace, name)
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    reused = [n for n, r in skipped.items() if "reused" in r]
    if reused:
        warnings.warn(f"not gated (called several times per forward pass): {reused}", stacklevel=3)
    return chosen, skipped


def _input_shape(model: nn.Module, input_shape: Sequence[int] | None, example: Tensor | None) -> tuple[int, ...]:
    if example is not None:
        if not isinstance(example, Tensor) or example.dim() < 1 or len(example) != 1:
            raise ValueError(f"example must be one input as a batch of one (1, ...), got "
                             f"{tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__}")
        return tuple(example.shape[1:])
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("pass input_shape=(C, H, W): the model has no `input_shape` attribute")
    if not isinstance(shape, Sequence) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be a non-empty sequence of positive ints (one input without the "
                         f"batch dim, e.g. (C, H, W)), got {shape!r}")
    return tuple(shape)


def _check_dtype(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("model has no parameters to gate")
    bad = {p.dtype for p in model.parameters() if p.dtype != torch.float32}
    if bad:
        raise ValueError(f"gate_model needs a float32 model (gates are trained in float32); it has parameters of "
                         f"dtype {sorted(map(str, bad))}: gate it first, then cast (e.g. .half()) for inference")
    return param.device


@contextmanager
def gates_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the model runs as if it were not gated (dense, gates not evaluated)."""
    info = getattr(model, "dynprune", None)
    if not isinstance(info, GatingInfo):
        yield model
        return
    previous, info.switch.enabled = info.switch.enabled, False
    try:
        yield model
    finally:
        info.switch.enabled = previous


@dataclass
class Plan:
    """What ``gate_model`` would do, decided before anything is added (see :func:`plan_sites`)."""

    granularity: Granularity
    trace: Trace
    example: Tensor
    """One input (1, ...) the model is traced and counted with."""
    sites: list[str]
    """Module paths that would be gated, in call order."""
    skipped: dict[str, str]
    """{candidate left out: why}."""
    existing: GatingInfo | None


def plan_sites(
    model: nn.Module,
    gate: str = "sigmoid",
    granularity: str | Granularity = "channel",
    where: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    skip_first: bool = True,
    skip_last: bool = True,
    example: Tensor | None = None,
    **gate_kwargs: float,
) -> Plan:
    """A dry run of :func:`gate_model` with the same arguments: the sites it would gate, without touching the
    model; raises the ValueError ``gate_model`` would raise (naming the granularity) where it would refuse."""
    resolved = list(resolve(granularity).values())
    if len(resolved) != 1:
        raise ValueError(f"gate_model takes one granularity, got {[g.name for g in resolved]}: call it once per "
                         "granularity")
    gran = resolved[0]
    misplaced = sorted(set(gate_kwargs) & set(gran.options()))
    if misplaced:
        raise ValueError(f"{misplaced} are options of granularity '{gran.name}', not of gate '{gate}': pass "
                         f"granularity={{'{gran.name}': {{{', '.join(repr(k) + ': ...' for k in misplaced)}}}}} "
                         f"(gate_model: a {type(gran).__name__} instance)")
    if reason := gran.refuses_gate(gate):
        raise ValueError(f"gate '{gate}' cannot decide at granularity '{gran.name}': {reason}")
    existing = getattr(model, "dynprune", None)
    if existing is not None and not isinstance(existing, GatingInfo):
        raise ValueError("model has a `dynprune` attribute that dynprune did not set")
    if existing is not None and gran.name in existing.granularities:
        raise ValueError(f"model is already gated at granularity '{gran.name}' (it has a `dynprune` attribute)")
    shape = _input_shape(model, input_shape, example)
    device = _check_dtype(model)
    example = example_input(example if example is not None else shape, device)
    with gates_disabled(model):
        try:
            trace = trace_model(model, example)
        except (RuntimeError, IndexError, ValueError, TypeError) as err:
            raise ValueError(f"model does not accept input of shape (N, {', '.join(map(str, shape))}) and dtype "
                             f"{example.dtype}: "
                             f"{err}") from err
    names, skipped = _select(gran, trace, where, skip_first, skip_last)
    if not names:
        raise ValueError(f"nothing to gate at granularity '{gran.name}' (where={where}); "
                         f"not eligible: {skipped or list(trace.layers)}")
    return Plan(gran, trace, example, names, skipped, existing)


def gate_model(
    model: nn.Module,
    gate: str = "sigmoid",
    granularity: str | Granularity = "channel",
    where: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    skip_first: bool = True,
    skip_last: bool = True,
    example: Tensor | None = None,
    **gate_kwargs: float,
) -> nn.Module:
    """Gate ``model`` (in place) with gates of family ``gate`` at ``granularity``.

    Args:
        model: any float32 nn.Module; ``input_shape`` (C, H, W) defaults to ``model.input_shape``.
        gate: a registered gate family (see ``dynprune.list_gates()``).
        granularity: a registered name (``channel``: output channels of conv/linear layers; ``block``: run or
            skip residual blocks/branches; ``width``; see ``dynprune.granularity.list_granularities()``) or a
            Granularity instance carrying its options (e.g. ``WidthGranularity(widths=[0.5, 1.0])``). Call
            again with another granularity to combine them.
        where: module-name patterns (fnmatch). An exact name that cannot be gated is an error saying why;
            patterns skip what cannot be gated. Default: channel = every Conv2d/Linear except the first, the
            classifier and those feeding a residual addition; block = every shape-preserving residual block.
        example: one input as a batch of one, of any dtype (e.g. integer token ids (1, T)), instead of
            ``input_shape`` (float zeros of that shape).
        gate_kwargs: passed to the gate, e.g. ``reduction=4, init_bias=3.0``.
    Returns:
        the same model, with ``model.dynprune`` (:class:`GatingInfo`) attached.
    """
    plan = plan_sites(model, gate, granularity, where, input_shape, skip_first, skip_last, example, **gate_kwargs)
    gran, trace, example, names, skipped, existing = (plan.granularity, plan.trace, plan.example, plan.sites,
                                                      plan.skipped, plan.existing)
    switch = existing.switch if existing else HookSwitch()
    dense = existing.flops if existing else FlopsProfile.build(model, example, trace.layers)
    sites = dict(existing.sites) if existing else {}
    for name in names:
        site = gran.attach(model, trace, name, gate, dict(gate_kwargs), switch)
        site.family = gate
        sites[name] = site
    order = {n: i.order for n, i in trace.modules.items()}
    sites = dict(sorted(sites.items(), key=lambda kv: order.get(kv[0], -1)))
    profile = dense.with_sites(sites, {n: s.units for n, s in sites.items()})
    gated_total, per_module = count_flops(model, example)
    profile.gate_flops = gated_total - profile.dense_total
    profile.site_gates = {n: per_module.get(s.gate_path, 0) for n, s in sites.items()}
    bypassed = [n for n, s in sites.items() if s.owner.skips_when_closed(s, trace.layers)]
    info = GatingInfo(sites, trace.layers, trace.modules, profile, switch, bypassed, skipped, example)
    model.dynprune = info
    with gates_disabled(model):
        if count_flops(model, example)[0] != profile.dense_total:
            raise RuntimeError("FLOPs of the gated backbone with its gates off differ from the dense count; "
                               "please report")
    return model


def gating_info(model: nn.Module) -> GatingInfo:
    """The GatingInfo of a gated model, or a clear error for an ungated one."""
    info = getattr(model, "dynprune", None)
    if not isinstance(info, GatingInfo):
        raise ValueError("model is not gated; call dynprune.gate_model(model, gate=...) first")
    return info


def gated_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{site name: the gated module (a layer or a block)} of a gated model, in call order."""
    return {name: model.get_submodule(name) for name in gating_info(model).sites}


def gates_of(model: nn.Module) -> dict[str, Gate]:
    """{site name: Gate} of a gated model, in call order."""
    return {name: model.get_submodule(site.gate_path) for name, site in gating_info(model).sites.items()}


def collect_masks(model: nn.Module) -> dict[str, Tensor]:
    """{site name: decisions (N, units)} from the last forward pass."""
    masks = {}
    for name, gate in gates_of(model).items():
        if gate.mask is None:
            raise RuntimeError(f"gated site '{name}' has no decisions yet; run a forward pass first")
        masks[name] = gate.mask
    return masks
