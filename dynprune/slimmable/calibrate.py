"""Post-training BatchNorm calibration of a slimmable supernet at any width (US-Nets style).

``torch.optim.swa_utils.update_bn`` resets every BatchNorm of the model, which would wipe the
statistics of the other widths' switchable BNs, so this is the same cumulative average
(``momentum=None``) restricted to the BNs of the calibrated width.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from dynprune.slimmable.convert import channels_at, set_width, spec_of
from dynprune.slimmable.layers import prefix_bn


@torch.no_grad()
def calibrate_bn(model: nn.Module, width: float, loader: Iterable, batches: int = 100) -> None:
    """Estimate the BN statistics of ``width`` from up to ``batches`` batches of ``loader``.

    A width without BNs yet gets new ones whose affine parameters start from the first channels of the
    nearest larger width's (the largest if none is larger). Batches are ``x`` or ``(x, y, ...)``, x (N, C, H, W).
    """
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width}")
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    spec = spec_of(model)
    norms = {name: model.get_submodule(name) for name in spec.norms}
    index = next((i for i, w in enumerate(spec.widths) if abs(w - width) < 1e-9), None)
    if index is None:
        trained = sorted(spec.widths[: spec.trained])
        source = spec.widths.index(trained[min(bisect.bisect_left(trained, width), len(trained) - 1)])
        table = channels_at(spec, width)
        for name, switch in norms.items():
            index = switch.add(prefix_bn(switch.bns[source], table[spec.norms[name]]))
        spec.widths.append(float(width))
    _cumulative_stats(model, [switch.bns[index] for switch in norms.values()], width, loader, batches)


def _cumulative_stats(model: nn.Module, bns: list[nn.BatchNorm2d], width: float, loader: Iterable,
                      batches: int) -> None:
    """Reset ``bns`` and average their batch statistics over ``batches`` forward passes at ``width``."""
    spec = spec_of(model)
    previous, was_training = spec.width, model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    set_width(model, width)
    model.train()
    device = next(model.parameters()).device
    try:
        for _, batch in zip(range(batches), loader, strict=False):
            x: Tensor = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        set_width(model, previous)
        model.train(was_training)


