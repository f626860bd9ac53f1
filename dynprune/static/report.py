"""Measurements and tables for pruning runs: parameter counts, per-layer sparsity, batch-1 latency
(FLOPs come from ``dynprune.flops.count_flops``); tables are written by ``dynprune.io.write_table``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

from dynprune.io import to_markdown, write_table  # noqa: F401  (re-exported)
from dynprune.static.prune import layer_sparsity, weight_layers

Row = Mapping[str, Any]


def param_counts(model: nn.Module) -> dict[str, int]:
    """``stored``: every parameter entry; ``nonzero``: those not equal to zero (masks applied)."""
    tensors = [p for n, p in model.named_parameters() if not n.endswith("_orig")]
    tensors += [getattr(m, n[:-5]) for m in model.modules() for n, _ in m.named_parameters(recurse=False)
                if n.endswith("_orig")]
    return {"stored": sum(t.numel() for t in tensors), "nonzero": sum(int((t != 0).sum()) for t in tensors)}


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per Conv2d / Linear: name, weight shape, weights, sparsity."""
    sparsity = layer_sparsity(model)
    return [
        {"layer": n, "shape": "x".join(map(str, m.weight.shape)), "weights": m.weight.numel(),
         "sparsity": round(sparsity[n], 4)}
        for n, m in weight_layers(model).items()
    ]


def measure_latency(
    model: nn.Module, input_shape: Sequence[int], batch_size: int = 1, min_run_time: float = 1.0,
    threads: int = 1,
) -> float:
    """Median seconds of one eval forward of a (batch_size, *input_shape) input (torch.utils.benchmark)."""
    model.eval()
    timer = benchmark.Timer(
        "with torch.no_grad(): model(x)", globals={"model": model, "x": torch.randn(batch_size, *input_shape),
                                                   "torch": torch},
        num_threads=threads,
    )
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def compare_latency(
    models: Mapping[str, nn.Module], input_shape: Sequence[int], repeats: int = 5, min_run_time: float = 0.3,
    batch_size: int = 1, threads: int = 1,
) -> dict[str, float]:
    """Seconds per forward of each model: the minimum over ``repeats`` interleaved ``measure_latency``
    medians, so a load spike on a shared machine hits every model alike and is then discarded."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    best = dict.fromkeys(models, float("inf"))
    for _ in range(repeats):
        for name, model in models.items():
            best[name] = min(best[name], measure_latency(model, input_shape, batch_size, min_run_time, threads))
    return best
