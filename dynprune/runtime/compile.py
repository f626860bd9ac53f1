"""``compile_for_inference``: an eval-only copy of a model that executes only the compute it keeps.

BatchNorms are folded into the layer before them (also in dense and statically pruned, physically thinned
models). In a gated model, the dynprune hooks are removed and each site is run by the executor its
granularity registers (:class:`~dynprune.runtime.executor.Executor`): the layers it gates or narrows run as
:class:`ThinLayer` (with the layer reading their output), and its module may be wrapped (e.g. a block that
runs on a sub-batch, or one that decides its width once). A granularity without an executor is refused, by name.
The compiled model is checked against the original before it is returned, with the gates' own decisions
and with forced mixed decisions at batch 1 and batch > 1, on both of its exact paths (thin and masked) and, for image
inputs, in both memory layouts (contiguous and channels-last); it then times the paths and layouts per batch-size
bucket and dispatches each call to the faster ones (:mod:`dynprune.runtime.dispatch`, ``CompiledModel.plan``).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dynprune.gates.base import Gate
from dynprune.granularity.base import GRANULARITIES, list_granularities
from dynprune.runtime.channels import ThinLayer
from dynprune.runtime.dispatch import LAYOUTS, PATHS, Plan, layouts_for, measure
from dynprune.runtime.fold import fold_batchnorm, set_submodule
from dynprune.runtime.layout import seed_layouts
from dynprune.runtime.widths import NestedSlots, WidthSlot, layer_slots
from dynprune.trace import LayerInfo

if TYPE_CHECKING:
    from dynprune.granularity import Site


def compilable() -> list[str]:
    """The registered granularities that register a runtime executor."""
    return [n for n in list_granularities() if GRANULARITIES.get(n).executor is not None]


class CompiledModel(nn.Module):
    """Eval-only wrapper: ``forward`` runs the compiled network under ``torch.inference_mode``.

    ``site_gates`` maps each gating site to the compiled copy of its gate (e.g. to ``force`` decisions).
    ``plan`` (:class:`~dynprune.runtime.dispatch.Plan`) says which exact path and memory layout a call of each batch
    size takes; :meth:`pin` fixes them for every call, :meth:`calibrate` measures the plan again on given inputs.
    """

    def __init__(self, net: nn.Module, folded: dict[str, str], site_gates: dict[str, Gate]) -> None:
        super().__init__()
        self.net = net.eval()
        self.folded = folded
        self.site_gates = site_gates
        self.plan = Plan()
        self.pinned: str | None = None
        self.pinned_layout: str | None = None
        self.switchable = [m for m in net.modules() if callable(getattr(type(m), "set_masked", None))]
        self.layered = [m for m in net.modules() if callable(getattr(type(m), "set_layout", None))]
        self.path, self.layout = "thin", "contiguous"

    @property
    def paths(self) -> tuple[str, ...]:
        """The exact paths this model can run: both with a switchable executor, else the thin one."""
        return PATHS if self.switchable else PATHS[:1]

    def train(self, mode: bool = True) -> CompiledModel:
        """Only ``eval()`` is allowed: the folded weights cannot be trained back into a BatchNorm."""
        if mode:
            raise ValueError("a compiled model is eval-only; train the original model instead (mode=True given)")
        return super().train(False)

    def pin(self, path: str | None, layout: str | None = None) -> CompiledModel:
        """Run every call on ``path`` (one of :data:`~dynprune.runtime.dispatch.PATHS`) and in memory ``layout``
        (one of :data:`~dynprune.runtime.dispatch.LAYOUTS`), or follow the plan again (None)."""
        if path is not None and path not in PATHS:
            raise ValueError(f"unknown path '{path}'; choose one of: {', '.join(PATHS)} (or None: follow the plan)")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"unknown layout '{layout}'; choose one of: {', '.join(LAYOUTS)} (or None: follow the "
                             "plan)")
        self.pinned, self.pinned_layout = path, layout
        return self

    def calibrate(self, example: Tensor, batch_sizes: Sequence[int] = (1, 8, 64), rounds: int = 5) -> Plan:
        """Time the paths (a gated model's two) and, for image inputs, the memory layouts at each batch size on
        inputs from ``example`` (N, ...; cycled up to the batch size) at the current thread count, and dispatch by
        the result from now on (returned and kept as ``plan``)."""
        if len(self.paths) == len(layouts_for(example)) == 1:  # one path, one layout: nothing to choose
            self.plan = Plan(threads=torch.get_num_threads())
            return self.plan
        pinned = self.pinned, self.pinned_layout
        try:
            self.plan = measure(lambda path, layout, x: self.pin(path, layout)(x), example, batch_sizes, rounds,
                                self.paths)
        finally:
            self.pin(*pinned)
        return self.plan

    def switch(self, path: str) -> None:
        """Switch every executor that has a masked path to ``path`` now (``forward`` does this per call; for
        calling submodules directly)."""
        for module in self.switchable:
            module.set_masked(path == "masked")
        self.path = path

    def forward(self, x: Tensor) -> Tensor:
        """(N, ...) -> the original model's output for x, on the pinned path or the plan's path for N."""
        path = self.pinned or self.plan.path(len(x))
        if path != self.path:
            self.switch(path)
        if x.dim() == 4:
            layout = self.pinned_layout or self.plan.layout(len(x))
            if layout != self.layout:
                for module in self.layered:
                    module.set_layout(layout)
                self.layout = layout
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.net(x)


def compile_for_inference(
    model: nn.Module, input_shape: Sequence[int] | None = None, tol: float = 1e-5, check_batch: int = 4,
    dispatch: Sequence[int] = (1, 8, 64), example: Tensor | None = None,
) -> CompiledModel:
    """An eval-only copy of ``model`` (left unchanged) with the same outputs that runs only the kept compute.

    ``model``: dense, statically pruned, or gated by :func:`dynprune.gate_model` at granularities that register
    an executor (:func:`compilable`). ``input_shape`` (C, H, W) defaults to ``model.input_shape``, else to the shape
    ``gate_model`` traced. Random batches of 1 and ``check_batch`` inputs must agree within ``tol`` relative to
    the largest output, else RuntimeError, on both exact paths.

    ``dispatch``: the batch sizes at which both paths are timed (:meth:`CompiledModel.calibrate`, at the current
    thread count); each call then takes the faster path of the nearest of them (empty: always the thin path).
    ``example`` (N, ...): the inputs timed; give real data for trained gates (their decisions on noise differ
    from those on data). Default: random normal inputs.
    """
    sites = _sites(model)
    shape = tuple(input_shape or getattr(model, "input_shape", None) or
                  (model.dynprune.flops.input_shape if sites else ()))
    if not shape:
        raise ValueError("pass input_shape=(C, H, W): the model has no `input_shape` attribute and is not gated")
    unsupported = sorted({s.granularity for s in sites.values() if s.owner.executor is None})
    if unsupported:
        raise NotImplementedError(f"cannot compile granularity {unsupported}: it registers no runtime executor "
                                  f"(Granularity.executor); compilable: {', '.join(compilable())}")
    param = next(model.parameters(), None)
    if param is None or not param.dtype.is_floating_point:
        raise ValueError(f"compile_for_inference needs a model with floating-point parameters, got "
                         f"{None if param is None else param.dtype}")
    was_training = model.training
    model.eval()
    try:
        probe = _check_inputs(model, shape, check_batch, param.device)
        if param.dtype == torch.float32:
            compiled = _compile_checked(model, sites, probe, tol)
        else:
            compiled = _compile_low_precision(model, sites, probe, tol, param.dtype)
        for module in compiled.net.modules():  # the checks' forced masks would crowd out the real ones
            if isinstance(module, ThinLayer):
                module.clear_cache()
        if dispatch:
            timed = _check_inputs(model, shape, max(dispatch), param.device) if example is None else example
            compiled.calibrate(timed.to(param.device, param.dtype) if timed.is_floating_point()
                               else timed.to(param.device), dispatch)
        return compiled
    finally:
        model.train(was_training)


def _compile_low_precision(model: nn.Module, sites: dict[str, Site], probe: Tensor, tol: float,
                           dtype: torch.dtype) -> CompiledModel:
    """Fold and check in float32 (the precision gates are trained in), then cast the compiled copy back to
    ``dtype`` and check again with decisions forced (rounding may flip the gates' own ones)."""
    compiled = _compile_checked(copy.deepcopy(model).float(), sites, probe, tol).to(dtype)
    scaled = tol * max(1.0, torch.finfo(dtype).eps / torch.finfo(torch.float32).eps)
    try:
        low = probe.to(dtype) if probe.is_floating_point() else probe
        _check(model, compiled, sites, low, scaled, own=False)
    except RuntimeError as err:
        raise RuntimeError(f"compiled in float32, the model cast back to {dtype} fails its check: {err}; "
                           "compile and run the float32 model instead") from err
    return compiled


def _check_inputs(model: nn.Module, shape: Sequence[int], batch: int, device: torch.device) -> Tensor:
    """Random check inputs (batch, *shape): normal floats, or, for a model gated from integer inputs (token ids
    (1, T)), ids drawn from the traced example's own."""
    traced = getattr(getattr(model, "dynprune", None), "example", None)
    if traced is None or traced.is_floating_point() or tuple(traced.shape[1:]) != tuple(shape):
        return torch.randn(batch, *shape, device=device)
    values = traced.flatten().to(device)
    return values[torch.randint(len(values), (batch, *shape), device=device)]


def _compile_checked(model: nn.Module, sites: dict[str, Site], example: Tensor, tol: float) -> CompiledModel:
    """Build with thin channel passing and check; if that disagrees, build with full-width outputs."""
    compiled = _build(model, sites, example, thin=True)
    try:
        _check(model, compiled, sites, example, tol)
    except RuntimeError as err:  # a thin output reached more than its one consumer: keep full widths
        warnings.warn(f"thin channel passing disagrees with the masked model ({err}); gated layers scatter "
                      "their kept channels back to full width instead", stacklevel=3)
        compiled = _build(model, sites, example, thin=False)
        _check(model, compiled, sites, example, tol)
    return compiled


def _sites(model: nn.Module) -> dict[str, Site]:
    """The gating sites of ``model`` in call order (its ``dynprune`` GatingInfo); empty for an ungated model.

    Read from the model, not through :mod:`dynprune.inject`: the granularities import their executors from this
    package, so the compiler depends on the granularity seam only."""
    info = getattr(model, "dynprune", None)
    return dict(info.sites) if info is not None else {}


def _gates(model: nn.Module, sites: dict[str, Site]) -> dict[str, Gate]:
    """{site: its gate} of a gated model."""
    return {name: model.get_submodule(site.gate_path) for name, site in sites.items()}


def _build(model: nn.Module, sites: dict[str, Site], example: Tensor, thin: bool) -> CompiledModel:
    """Copy ``model``, strip its gating hooks, fold BN, put executors at the sites."""
    net = copy.deepcopy(model).eval()
    gates = {}
    for module in net.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if type(h).__module__.startswith("dynprune.")]:
                del hooks[key]
    for name, site in sites.items():  # gates leave the modules, so folding and wrapping never copy them
        owner, _, child = site.gate_path.rpartition(".")
        gates[name] = net.get_submodule(site.gate_path)
        delattr(net.get_submodule(owner), child)
    if hasattr(net, "dynprune"):
        del net.dynprune
    executors = {name: site.owner.executor for name, site in sites.items()}
    net, folded = fold_batchnorm(net, example[:1], keep=set().union(*(executors[n].keep(s) for n, s in sites.items())))
    gated = {layer: gate for n, s in sites.items() for layer, gate in executors[n].gated(s, gates[n]).items()}
    slots = {n: executors[n].narrowed(s) for n, s in sites.items()}
    narrowed = layer_slots(slots)
    if gated or narrowed:
        _thin_layers(net, gated, narrowed, model.dynprune.layers, thin)
    for name in sorted(sites, key=lambda n: -n.count(".")):  # inner sites first: outer paths stay valid
        for path, module in executors[name].replace(sites[name], gates[name], net.get_submodule).items():
            set_submodule(net, path, module)
        inner = [gates[n] for n in sites if n.startswith(name + ".")]
        wrapped = executors[name].wrap(net.get_submodule(name), sites[name], gates[name], inner, slots[name])
        if wrapped is not None:
            set_submodule(net, name, wrapped)
    for executor in {id(e): e for e in executors.values()}.values():
        own = {n: s for n, s in sites.items() if executors[n] is executor}
        executor.finish(net, own, {n: gates[n] for n in own})
    seed_layouts(net)
    return CompiledModel(net, folded, gates)


def _thin_layers(net: nn.Module, gates: dict[str, Gate], narrowed: dict[str, WidthSlot | NestedSlots],
                 layers: dict[str, LayerInfo], thin: bool) -> None:
    """Replace each layer gated per channel (``gates``) or narrowed by width sites, and the one layer reading
    its output thin, by a ThinLayer (in call order)."""
    channel = list(dict.fromkeys([*gates, *narrowed]))
    readers = {name: [i for i in layers.values() if i.producer == name] for name in channel}
    thin_source = {}
    for name in channel:
        consumer = readers[name][0] if len(readers[name]) == 1 else None
        module = net.get_submodule(consumer.name) if consumer else None
        groups = getattr(module, "groups", 1)
        depthwise = groups > 1 and groups == consumer.in_channels == consumer.out_channels if consumer else False
        if (thin and consumer and consumer.calls == 1 and (groups == 1 or depthwise)
                and consumer.in_channels % layers[name].out_channels == 0):
            thin_source[consumer.name] = name
    executors: dict[str, ThinLayer] = {}
    for info in sorted(layers.values(), key=lambda i: i.order):
        if info.name not in channel and info.name not in thin_source:
            continue
        layer = net.get_submodule(info.name)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"compile_for_inference cannot thin the channels of '{info.name}': the channel runtime "
                             f"runs Conv2d and Linear layers, not {type(layer).__name__} (a transformers Conv1D MLP "
                             "gates and compiles at granularity 'neuron')")
        source = executors[thin_source[info.name]] if info.name in thin_source else None
        scatter = info.name not in thin_source.values()
        executors[info.name] = ThinLayer(layer, gates.get(info.name), source, scatter, narrowed.get(info.name))
    for name, executor in executors.items():
        set_submodule(net, name, executor)


class OwnDecisionsDiffer(RuntimeError):
    """The compiled model's outputs differ from the masked model's with each making its own gate decisions."""


@torch.no_grad()
def _check(model: nn.Module, compiled: CompiledModel, sites: dict[str, Site], example: Tensor, tol: float,
           own: bool = True) -> None:
    """RuntimeError unless ``compiled`` matches ``model`` on each of its paths, in each memory layout for image
    inputs, with forced mixed decisions and (``own``) with the gates' own decisions.

    A gate scoring a unit within float32 rounding of its threshold may decide differently in the two models (their
    inputs are summed in other orders), most often with thresholds calibrated on data (TEAL / CATS style); where
    the own decisions differ in float32, both models are copied to float64, where rounding cannot move a score
    across the threshold, and checked there: if they agree, the difference was rounding (a warning says so), and
    if they do not, the compiled model decides wrongly (an error)."""
    for path, layout in itertools.product(compiled.paths, layouts_for(example)):
        compiled.pin(path, layout)
        try:
            try:
                _check_path(model, compiled, sites, example, tol, own)
            except OwnDecisionsDiffer as err:
                if not example.is_floating_point() or example.dtype == torch.float32:
                    _recheck_in_float64(model, compiled, sites, example, tol, path, layout, err)
                    _check_path(model, compiled, sites, example, tol, own=False)
                else:
                    raise
        except RuntimeError as err:
            raise RuntimeError(f"{err} on the {path} path ({layout} layout)") from err
        finally:
            compiled.pin(None)


def _recheck_in_float64(model: nn.Module, compiled: CompiledModel, sites: dict[str, Site], example: Tensor,
                        tol: float, path: str, layout: str, err: OwnDecisionsDiffer) -> None:
    """The gates' own decisions checked again on float64 copies of both models (see :func:`_check`)."""
    model64, compiled64 = copy.deepcopy(model).double(), copy.deepcopy(compiled).double()
    compiled64.pin(path, layout)
    x = example.double() if example.is_floating_point() else example
    try:
        _check_path(model64, compiled64, sites, x, tol, own=True, forced=False)
    except OwnDecisionsDiffer as err64:
        raise OwnDecisionsDiffer(f"{err64} (in float64 too, so not by rounding)") from err
    warnings.warn(f"with the gates' own decisions the compiled model differs from the masked model in float32 "
                  f"({err}) and agrees in float64: gate scores within rounding of their threshold decide "
                  "differently in the two (equivalent) computations", stacklevel=6)


def _check_path(model: nn.Module, compiled: CompiledModel, sites: dict[str, Site], example: Tensor, tol: float,
                own: bool, forced: bool = True) -> None:
    """RuntimeError unless ``compiled`` matches ``model`` on its current path (:class:`OwnDecisionsDiffer` when only
    the trial with the gates' own decisions fails); ``forced``: also with forced mixed decisions."""
    originals = _gates(model, sites)
    gen = torch.Generator().manual_seed(0)
    trials: list[tuple[Tensor, dict[str, Tensor] | None]] = [(example, None)] if own or not sites else []
    if sites and forced:  # decisions per input (units,) or per position (T, units), as the gates make them
        model(example[:1])
        shapes = {name: gate.mask.shape[1:] for name, gate in originals.items()}
    for x in (example[:1], example) if sites and forced else ():
        mixed = {}
        for name in sites:
            decisions = (torch.rand(len(x), *shapes[name], generator=gen) < 0.5).float()
            if len(x) > 1:  # every unit on for one input, every unit off for another
                decisions[0], decisions[1] = 1.0, 0.0
            mixed[name] = decisions.to(x.device, x.dtype)
        trials.append((x, mixed))
    for x, forced_decisions in trials:
        before = {name: gate.forced for name, gate in originals.items()}
        try:
            for name, decisions in (forced_decisions or {}).items():
                originals[name].force(decisions)
                compiled.site_gates[name].force(decisions)
            ref, out = model(x), compiled(x)
        finally:
            for name, gate in originals.items():
                gate.force(before[name])
                compiled.site_gates[name].force(before[name])
        err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
        if err > tol * max(1.0, scale):
            what = "forced mixed decisions" if forced_decisions else "the gates' decisions"
            raise (OwnDecisionsDiffer if sites and not forced_decisions else RuntimeError)(  # no gates: no decisions
                f"compiled model differs from the original by {err:.3g} with {what} at batch {len(x)} (tolerance "
                f"{tol:g} x {scale:.3g})")
