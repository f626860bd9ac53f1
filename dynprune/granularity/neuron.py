"""Neuron granularity: per token, which hidden units of a transformer MLP run (the unit of Deja Vu, CATS, TEAL).

A site is an MLP's first Linear (``fc1``; transformers' ``Conv1D`` in GPT-2 counts as a Linear) on tokens (N, T, D)
whose output reaches another Linear (``fc2``) through zero-preserving ops only (GELU, ReLU, SiLU, dropout: a unit
that is 0 stays 0). Its gate reads fc1's input per token and decides (N, T, H) over the H hidden units; a unit that
is off is exactly zero after the activation, so it costs nothing in fc1's row and fc2's column: both layers' FLOPs
scale with the kept fraction of each token (the channel formula with per-position masks).
:func:`calibrate_thresholds` turns any family's gates into the training-free magnitude-threshold baseline (TEAL /
CATS style). Compiled, fc1 and fc2 run on the units the tokens keep (:mod:`dynprune.runtime.neurons`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynprune.granularity.base import FlopsTerms, Granularity, Site, add_gate, layout_of, register_granularity
from dynprune.hooks import DecideHook, HookSwitch, MaskHook
from dynprune.runtime.neurons import NeuronExecutor
from dynprune.trace import LayerInfo, Trace, linear_weight, reaches_residual


@dataclass
class NeuronSite(Site):
    """A gated MLP fc1; ``readers``: the Linear layers reading its hidden units (an MLP's fc2)."""

    readers: tuple[str, ...] = ()


@register_granularity("neuron")
class NeuronGranularity(Granularity):
    """Gates (N, T, H) per-token masks over the hidden units of token MLPs (fc1 -> activation -> fc2)."""

    name = "neuron"
    executor = NeuronExecutor()

    def candidates(self, trace: Trace) -> list[str]:
        return list(trace.layers)

    def ineligible(self, trace: Trace, name: str) -> str | None:
        info = trace.layers.get(name)
        if info is None or info.channel_dim != -1:
            return "it is not a Linear layer"
        if len(trace.modules[name].in_shape or ()) != 2:
            return f"its input {trace.modules[name].in_shape} is not tokens (T, D)"
        if info.residual or info.calls != 1:
            return "its output feeds a residual addition, or it is called several times per forward pass"
        if not any(other.producer == name for other in trace.layers.values()):
            return ("its output does not reach another Linear through zero-preserving ops only (an MLP's fc1 "
                    "does; attention's q/k/v do not)")
        return None

    def default(self, trace: Trace, skip_first: bool, skip_last: bool) -> list[str]:
        return [n for n in trace.layers if self.ineligible(trace, n) is None]

    def attach(self, model: nn.Module, trace: Trace, name: str, gate: str, gate_kwargs: dict[str, float],
               switch: HookSwitch) -> Site:
        info = trace.layers[name]
        layer = model.get_submodule(name)
        layout = layout_of(trace.modules[name].in_shape, "tokens", per_position=True)
        net, path = add_gate(model, name, gate, info.in_channels, info.out_channels, gate_kwargs, layout)
        layer.register_forward_pre_hook(DecideHook(switch, net))
        layer.register_forward_hook(MaskHook(switch, net, -1))
        readers = tuple(other.name for other in trace.layers.values() if other.producer == name)
        return NeuronSite(name, self, info.out_channels, (name,), layout, gate_path=path, readers=readers)

    def flops_terms(self, site: Site, mask: Tensor) -> FlopsTerms:
        return FlopsTerms(masks={site.name: mask})

    def skips_when_closed(self, site: Site, layers: dict[str, LayerInfo]) -> bool:
        """Every unit off leaves fc2's bias on the residual stream: a skipped branch, not a cut network."""
        return reaches_residual(layers, site.name)


def _linear_through_relu(gate: nn.Module, a: Tensor, b: Tensor, bias: Tensor) -> None:
    """Set the gate's SE net fc2(relu(fc1(x))) to the linear map b @ a @ x + bias: relu(v) - relu(-v) = v, so fc1
    holds [a; -a] and fc2 [b, -b] (rank r = len(a); hidden units beyond 2r are zeroed)."""
    r = len(a)
    gate.fc1.weight.zero_()
    gate.fc1.bias.zero_()
    gate.fc2.weight.zero_()
    gate.fc1.weight[:r], gate.fc1.weight[r:2 * r] = a, -a
    gate.fc2.weight[:, :r], gate.fc2.weight[:, r:2 * r] = b, -b
    gate.fc2.bias.copy_(bias)


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, batches: Iterable[Tensor], sparsity: float,
                         sequential: bool = True) -> dict[str, float]:
    """Training-free neuron decisions (the TEAL / CATS baseline): {site: threshold}.

    Every neuron site's gate (any family: its SE net and hard rule are used as they are) becomes a rank-r estimate
    of its fc1's pre-activations, the truncated SVD of fc1's weight with r = (gate hidden width) // 2 (so it costs
    what a learned gate of that width costs), minus one threshold per layer: the ``sparsity`` quantile of the
    estimates over every token and unit of ``batches`` (model inputs, e.g. token ids (N, T)). A unit then runs for a
    token when its estimated pre-activation reaches the threshold: for ReLU / GELU / SiLU MLPs the units with the
    largest activations (GELU's negative lobe is at most 0.17 in magnitude). ``sequential`` (default): the sites
    are calibrated one after another in forward order, each on the inputs it sees with the earlier sites already
    thresholded (the later ones kept whole), so the gated model drops ``sparsity`` of the units at every site on
    the calibration data; otherwise every site is calibrated on the dense model's activations in one pass (then a
    deep model's later sites drift from the target once the earlier ones drop units). The gates keep their
    family; training the model further starts the learned gates from this rule.
    """
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    info = getattr(model, "dynprune", None)
    sites = {n: s for n, s in (info.sites.items() if info is not None else ()) if s.granularity == "neuron"}
    if not sites:
        raise ValueError("calibrate_thresholds needs a model gated at granularity 'neuron' (gate_model(..., "
                         "granularity='neuron'))")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate_thresholds got no calibration batches")
    gates = {name: model.get_submodule(site.gate_path) for name, site in sites.items()}
    for name, gate in gates.items():
        layer = model.get_submodule(name)
        weight = linear_weight(layer)  # (H, D), also for a transformers Conv1D
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        r = min(gate.fc1.out_features // 2, len(s))
        if r < 1:
            raise ValueError(f"the gate of '{name}' has {gate.fc1.out_features} hidden units; the threshold rule "
                             "needs >= 2 (raise min_hidden)")
        root = s[:r].sqrt()
        bias = layer.bias if layer.bias is not None else torch.zeros(len(weight))
        _linear_through_relu(gate, (root[:, None] * vh[:r]).to(gate.fc1.weight),
                             (u[:, :r] * root).to(gate.fc2.weight), bias)
    was_training, enabled = model.training, info.switch.enabled
    forced = {name: gate.forced for name, gate in gates.items()}
    thresholds: dict[str, float] = {}
    model.eval()
    try:
        if not sequential:
            info.switch.enabled = False
            estimates = _estimates(model, gates, list(gates), batches)
            for name in gates:
                thresholds[name] = _threshold(gates[name], estimates[name], sparsity)
            return thresholds
        info.switch.enabled = True
        for gate in gates.values():  # every site kept whole until its turn
            gate.force(torch.ones(gate.fc2.out_features, dtype=torch.bool, device=gate.fc2.weight.device))
        for name in _forward_order(model, list(gates), batches[0]):
            estimates = _estimates(model, gates, [name], batches)
            thresholds[name] = _threshold(gates[name], estimates[name], sparsity)
            gates[name].force(None)
        return thresholds
    finally:
        info.switch.enabled = enabled
        model.train(was_training)
        for name, gate in gates.items():
            gate.force(forced[name])


def _estimates(model: nn.Module, gates: dict[str, nn.Module], names: list[str],
               batches: list[Tensor]) -> dict[str, Tensor]:
    """The gates' scores (flattened over tokens and units) at sites ``names`` over ``batches``."""
    found: dict[str, list[Tensor]] = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, inputs, name=name: found[name].append(gates[name].logits(inputs[0]).flatten()))
        for name in names]
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(values) for name, values in found.items()}


def _threshold(gate: nn.Module, values: Tensor, sparsity: float) -> float:
    """Shift ``gate``'s scores by the ``sparsity`` quantile of ``values``; returns that threshold."""
    k = max(1, round(sparsity * len(values)))  # the k-th smallest: a fraction `sparsity` lies below it
    threshold = float(values.kthvalue(k).values)
    gate.fc2.bias.sub_(threshold)
    return threshold


def _forward_order(model: nn.Module, names: list[str], batch: Tensor) -> list[str]:
    """``names`` in the order a forward pass of ``batch`` calls them."""
    order: list[str] = []
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, _inputs, name=name: order.append(name)) for name in names]
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()
    if sorted(order) != sorted(names):
        missing = sorted(set(names) - set(order))
        raise ValueError(f"calibrate_thresholds: a forward pass does not call each site once (not called: {missing})")
    return order
