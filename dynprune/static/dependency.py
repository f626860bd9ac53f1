"""Channel groups of any model, read off Torch-Pruning's ``DependencyGraph`` (the one graph analysis
that static pruning uses).

A group is Torch-Pruning's: the output channels of a root conv / linear layer with every parameter
coupled to them (the root's bias, the norm after it, a depthwise conv that reads them, the other
producers of a residual sum they join, the inputs of every consumer). ``ChannelGroup`` keeps the
*producing* members (weight rows, biases, norm affine entries): structured pruning masks those, so a
pruned channel outputs exactly zero everywhere, and physical removal (``prune_group``) slices the whole
group, which then computes the same function.

A grouped (not depthwise) conv among the members or consumers splits the root channels into
``conv_groups`` equal blocks that must lose the same offsets, as Torch-Pruning's pruners do
(channels ``c`` and ``c + k * C / conv_groups`` go together); depthwise convs follow their input.

Torch-Pruning follows any traced model, but not every op maps channel indices as it assumes (e.g.
``F.pad`` over channels; ResNet option-A shortcuts become ``ChannelPad`` modules first, see
``shortcuts.py``). So each group is *checked*: one offset is masked
in one copy and removed in another, and a group whose two copies disagree (or whose removal fails) is
left out with a warning. A model without any checked group raises ``ValueError``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import prune

from dynprune.static.shortcuts import CUSTOMIZED_PRUNERS, ChannelPad, explicit_shortcuts, zero_out_channels

# Module types whose per-channel parameters a mask can zero so that the channel's output is exactly 0
# (a ChannelPad has no parameters: its masked output channels become zero channels).
MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm, ChannelPad)
_CACHE: dict[tuple, tuple[list[ChannelGroup], list[str]]] = {}


@dataclass(frozen=True, eq=False)
class Member:
    """Rows ``rows`` (dim 0 of weight and bias) of module ``name`` produce root channels ``root_rows``."""

    name: str
    rows: Tensor
    root_rows: Tensor


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """The ``channels`` output channels of layer ``root``, the ``members`` that produce them, and the
    number of equal blocks (``conv_groups``) that a grouped conv splits them into."""

    root: str
    channels: int
    members: tuple[Member, ...]
    conv_groups: int = 1

    @property
    def block(self) -> int:
        """Channels per block: the unit that pruning chooses offsets in."""
        return self.channels // self.conv_groups

    def expand(self, offsets: Tensor) -> Tensor:
        """(C,) bool: the (C / conv_groups,) bool ``offsets`` repeated in every block."""
        return offsets.repeat(self.conv_groups)

    def offsets(self, channels: Tensor) -> Tensor:
        """(C / conv_groups,) bool: offsets selected in *every* block by the (C,) bool ``channels``."""
        return channels.reshape(self.conv_groups, self.block).all(0)

    def member_rows(self, channels: Tensor) -> dict[str, Tensor]:
        """{member name: rows to zero / remove} for the (C,) bool selection ``channels`` of the root."""
        return {m.name: m.rows[channels[m.root_rows]] for m in self.members}


def input_shape_of(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    """``input_shape`` (C, H, W), else the ``input_shape`` a registered backbone records."""
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError(f"{type(model).__name__} has no input_shape attribute; pass input_shape=(C, H, W)")
    return tuple(int(s) for s in shape)


def fold_masks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``torch.nn.utils.prune`` mask folded into its parameter."""
    with torch.no_grad():
        for m in model.modules():  # masked tensors with autograd history cannot be deep-copied
            for hook in m._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    hook(m, None)
    copied = copy.deepcopy(model)
    for m in copied.modules():
        names = [h._tensor_name for h in m._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
        for pname in names:
            prune.remove(m, pname)
    return copied


def dependency_graph(model: nn.Module, input_shape: Sequence[int]) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced in eval mode on one (1, *input_shape) input."""
    was_training = model.training
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model.eval(), example_inputs=torch.zeros(1, *input_shape, device=device), verbose=False,
                customized_pruners=CUSTOMIZED_PRUNERS)
    except Exception as err:  # the tracer raises anything from a failed forward to an assertion
        raise ValueError(f"cannot trace the channel dependencies of {type(model).__name__}: {err}") from err
    finally:
        model.train(was_training)


def tp_group(graph: tp.DependencyGraph, model: nn.Module, root: str, channels: Sequence[int]) -> tp.Group:
    """Torch-Pruning's group of output ``channels`` of layer ``root`` (what its importances score)."""
    layer = model.get_submodule(root)
    return graph.get_pruning_group(layer, graph.get_pruner_of_module(layer).prune_out_channels, list(channels))


def prune_group(graph: tp.DependencyGraph, model: nn.Module, root: str, channels: Sequence[int]) -> None:
    """Physically remove output ``channels`` of layer ``root`` and everything coupled to them, in place."""
    tp_group(graph, model, root, channels).prune()


def channel_groups(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[ChannelGroup]:
    """The checked channel groups of ``model`` (roots in module order); cached per architecture. Option-A
    ResNet shortcuts of ``model`` become ``ChannelPad`` modules first (in place, same function)."""
    explicit_shortcuts(model)
    shape = input_shape_of(model, input_shape)
    key = (type(model), shape, tuple((n, type(m), m.extra_repr()) for n, m in model.named_modules()))
    if key not in _CACHE:
        folded = fold_masks(model)
        candidates, unfit = _candidate_groups(folded, shape)
        checks = _removal_matches(folded, candidates, shape)
        good = [g for g, ok in zip(candidates, checks, strict=True) if ok]
        left_out = unfit + [g.root for g, ok in zip(candidates, checks, strict=True) if not ok]
        if not good:
            raise ValueError(f"no channel group of {type(model).__name__} can be removed without changing its "
                             f"outputs (checked: {', '.join(left_out) or 'none found'})")
        _CACHE[key] = (good, left_out)
    good, left_out = _CACHE[key]
    if left_out:  # the warnings module shows it once per call site
        warnings.warn(f"channel groups rooted at {left_out} are not prunable: removing one of their channels "
                      "fails or changes the outputs (e.g. F.pad over channels, or an op that is not zero at 0)",
                      stacklevel=2)
    return good


def _output_layers(model: nn.Module, shape: tuple[int, ...]) -> list[nn.Module]:
    """Leaf layers whose output is the model's output (their output channels are the logits)."""
    outputs: dict[int, nn.Module] = {}
    handles = [m.register_forward_hook(lambda mod, _, out: outputs.__setitem__(id(out), mod))
               for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            result = model.eval()(torch.zeros(1, *shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    found = outputs.get(id(result))
    return [found] if found is not None else []


def _conv_groups(modules: list[nn.Module]) -> int:
    """Least common multiple of the ``groups`` of the grouped, not depthwise, convs among ``modules``."""
    return math.lcm(1, *(m.groups for m in modules if isinstance(m, nn.modules.conv._ConvNd)
                         and 1 < m.groups < m.out_channels))


def _candidate_groups(model: nn.Module, shape: tuple[int, ...]) -> tuple[list[ChannelGroup], list[str]]:
    """Every Torch-Pruning group rooted at a conv / linear whose producing members can all be masked,
    and the roots of the groups whose channels the grouped convs in them cannot split evenly."""
    graph = dependency_graph(model, shape)
    names = {m: n for n, m in model.named_modules()}
    groups, unfit = [], []
    for group in graph.get_all_groups(ignored_layers=_output_layers(model, shape),
                                      root_module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        members, maskable = [], True
        for item in group:
            module = item.dep.target.module
            if not graph.is_out_channel_pruning_fn(item.dep.handler) or module not in names:
                continue  # inputs of consumers and Torch-Pruning's own op nodes need no mask
            maskable &= isinstance(module, MASKABLE)
            members.append(Member(names[module], torch.as_tensor(item.idxs), torch.as_tensor(item.root_idxs)))
        root, channels = names[group[0].dep.target.module], len(group[0].idxs)
        conv_groups = _conv_groups([item.dep.target.module for item in group])
        if not (maskable and members):
            continue
        if channels % conv_groups:
            unfit.append(root)
        else:
            groups.append(ChannelGroup(root, channels, tuple(members), conv_groups))
    order = {n: i for i, n in enumerate(names.values())}
    return sorted(groups, key=lambda g: order[g.root]), unfit


def zero_rows(model: nn.Module, rows: dict[str, Tensor]) -> None:
    """Set rows (dim 0) of each named module's weight and bias (a ChannelPad: its outputs) to zero, in place."""
    with torch.no_grad():
        for name, idx in rows.items():
            module = model.get_submodule(name)
            if zero_out_channels(module, idx):
                continue
            for pname in ("weight", "bias"):
                p = getattr(module, pname, None)
                if p is not None:
                    p[idx] = 0


def _removal_matches(folded: nn.Module, groups: list[ChannelGroup], shape: tuple[int, ...]) -> list[bool]:
    """Per group: masking its middle offset (in every block) and removing it give the same outputs.

    Groups are tried together and a failing set is split in halves (group testing), restoring the
    modules that Torch-Pruning changed in place after each try (one traced graph for all tries).
    """
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(next(folded.parameters()).device)
    removed = copy.deepcopy(folded).eval()
    graph = dependency_graph(removed, shape)
    saved = {m: _snapshot(m) for m in removed.modules()}

    def matches(tried: list[ChannelGroup]) -> bool:
        masked = copy.deepcopy(folded).eval()
        try:
            for g in tried:
                middle = torch.zeros(g.block, dtype=torch.bool)
                middle[g.block // 2] = True
                one = g.expand(middle)
                zero_rows(masked, g.member_rows(one))
                prune_group(graph, removed, g.root, one.nonzero().flatten().tolist())
            with torch.no_grad():
                want, got = masked(x), removed(x)
        except (RuntimeError, ValueError, IndexError, AssertionError):
            return False
        finally:
            for m, state in saved.items():
                m.__dict__.update(_snapshot_copy(state))
        scale = float(want.abs().max())
        return want.shape == got.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale)

    def search(tried: list[ChannelGroup]) -> list[bool]:
        if matches(tried):
            return [True] * len(tried)
        if len(tried) == 1:
            return [False]
        half = len(tried) // 2
        return search(tried[:half]) + search(tried[half:])

    return search(groups) if groups else []


def _snapshot(module: nn.Module) -> dict:
    """The module state Torch-Pruning replaces when it prunes: parameter / buffer dicts and attributes."""
    return _snapshot_copy({k: v for k, v in module.__dict__.items() if not k.startswith("_")
                           or k in ("_parameters", "_buffers")})


def _snapshot_copy(state: dict) -> dict:
    """Shallow copies of the dicts in ``state`` (so restoring twice works)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in state.items()}
