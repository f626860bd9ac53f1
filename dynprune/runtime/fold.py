"""BatchNorm folding for inference: every conv/linear whose raw output feeds a BatchNorm absorbs it.

Pairs are found by the data-flow trace (:mod:`dynprune.trace`), so any nn.Module works, including ones
with Python control flow that ``torch.fx`` cannot trace. The weights are merged by
``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``; the norm becomes ``nn.Identity``.
"""

from __future__ import annotations

import copy
from collections.abc import Collection

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from dynprune.runtime.wrap import Wrapper
from dynprune.trace import trace_layers


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` of ``model`` by ``module`` (through executors wrapping its parents)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    while isinstance(parent, Wrapper) and child not in parent._modules:
        parent = parent._modules[parent.wrapped]
    setattr(parent, child, module)


@torch.no_grad()
def fold_batchnorm(
    model: nn.Module, example: Tensor, keep: Collection[str] = (),
) -> tuple[nn.Module, dict[str, str]]:
    """An eval-mode copy of ``model`` with each BatchNorm folded into the layer before it.

    ``example`` is one input batch (N, ...) for the trace; layers or norms named in ``keep`` stay as they
    are. Returns (folded copy, {layer: folded norm}). A norm that normalises the raw outputs of several
    layers is folded into each of them.
    """
    folded = copy.deepcopy(model).eval()
    infos = trace_layers(folded, example)
    pairs = {name: info.norm for name, info in infos.items()
             if info.norm is not None and name not in keep and info.norm not in keep}
    for name, norm_name in pairs.items():
        layer, norm = folded.get_submodule(name), folded.get_submodule(norm_name)
        fuse = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
        set_submodule(folded, name, fuse(layer, norm))
    for norm_name in set(pairs.values()):
        set_submodule(folded, norm_name, nn.Identity())
    return folded, pairs
