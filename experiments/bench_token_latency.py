"""Measured CPU latency of the compiled token-gated ViT against the dense ViT, at batch 1 and batch 64.

The ViT of ``configs/fmnist_vit.yaml`` (patch 4: 49 tokens + CLS, dim 96, depth 6) is gated at granularity
``token`` (DynamicViT's sites, before blocks 1, 3 and 4). Its untrained gates are calibrated site by site (the last
layer's bias) so that each keeps ``--keep`` of the patch tokens still present on random inputs, deciding per token
from the features (so inputs keep different numbers of tokens, as a trained model's do). Arms, interleaved:

- ``dense``: ``compile_for_inference`` of the ungated ViT (the baseline of every speedup);
- ``token pad`` / ``token group`` / ``token loop``: the compiled token-gated ViT, inputs with different keep counts
  padded to the longest and masked, sorted by count and padded per group of 16, or run one at a time (one arm at
  batch 1, where all gather);
- ``skewed``: batches of 2, 8 and 64 with half of the inputs keeping every token and half only the CLS token (forced
  decisions, gates idle): where padding wastes most, to choose the default runtime.

``--width-mult 4`` runs the same at dim 384 (DeiT-Small's width), where matmuls, not per-op dispatch, dominate.

Theoretical speedup = dense FLOPs / the compiled model's FlopCounterMode FLOPs per input (gates included, padding
excluded); achieved / theoretical = measured speedup / theoretical; executed = dense FLOPs / the FLOPs the arm
runs (padding included). Timing: ``torch.utils.benchmark`` at 1 thread, ``--rounds`` rounds each timing every arm
in turn for ~0.1 s (see :func:`paired_times`); a speedup is the median over rounds of the ratio to the dense arm
of the same round, so load that drifts between rounds on a shared machine cancels. The load average is recorded
before and after.

    python experiments/bench_token_latency.py                  # experiments/results/token_latency.{csv,md}
    python experiments/bench_token_latency.py --width-mult 4   # ... token_latency_dim384.{csv,md}
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp
from dynprune.io import atomic_write, to_markdown, write_csv
from dynprune.runtime import compile_for_inference
from dynprune.runtime.tokens import BATCH_RUNTIMES, GROUP

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)


def flops(model: nn.Module, x: Tensor) -> int:
    """FlopCounterMode's count of ``model(x)``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@torch.no_grad()
def calibrate(model: nn.Module, x: Tensor, keep: float) -> list[float]:
    """Shift each token gate's last bias, in call order, so that it keeps ``keep`` of the patch tokens still present
    on ``x``; returns the kept fraction of the patch tokens after each site."""
    gates = dp.gates_of(model)
    names = list(gates)
    for i, gate in enumerate(gates.values()):
        model(x)
        scores = gate.scores[:, 1:, 0]
        present = dp.collect_masks(model)[names[i - 1]][:, 1:, 0] > 0 if i else torch.ones_like(scores, dtype=bool)
        gate.fc2.bias -= torch.quantile(scores[present], 1 - keep)
    model(x)
    return [float(m[:, 1:, 0].mean()) for m in dp.collect_masks(model).values()]


def run_forced(model: nn.Module, decisions: dict[str, Tensor] | None, x: Tensor) -> Tensor:
    """``model(x)`` with its site gates forced to ``decisions`` (None: their own), restored afterwards."""
    for name, d in (decisions or {}).items():
        model.site_gates[name].force(d)
    try:
        return model(x)
    finally:
        for name in decisions or {}:
            model.site_gates[name].force(None)


def paired_times(arms: dict[Any, Callable[[], object]], rounds: int, seconds: float = 0.1) -> dict[Any, list[float]]:
    """Per arm, its time per call (ms) in each of ``rounds`` rounds; a round times every arm in turn for about
    ``seconds`` each (call counts fixed once from ``blocked_autorange``), so arms compared within a round shared
    the machine's load of that moment."""
    calls = {}
    for key, fn in arms.items():
        once = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1).blocked_autorange(min_run_time=0.2)
        calls[key] = max(1, round(seconds / once.median))
    times: dict[Any, list[float]] = {key: [] for key in arms}
    for _ in range(rounds):
        for key, fn in arms.items():
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1)
            times[key].append(timer.timeit(calls[key]).mean * 1e3)
    return times


def load() -> str:
    """The 1, 5 and 15 minute load averages (``uptime``)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.7, help="kept fraction of present tokens at each site")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--width-mult", type=float, default=1.0, help="ViT width multiplier (dim 96 x it)")
    parser.add_argument("--out", default=None, help="output stem (default: results/token_latency[_dim<D>])")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = dp.backbones.create("vit", num_classes=10, in_chans=1, input_size=28, width_mult=args.width_mult).eval()
    dim = dense.head.in_features
    compiled = {}
    for runtime in BATCH_RUNTIMES:
        torch.manual_seed(1)  # the same gates for both runtimes
        model = dp.gate_model(copy.deepcopy(dense), "sigmoid", granularity={"token": {"batch_runtime": runtime}})
        fractions = calibrate(model, torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(2)), args.keep)
        compiled[runtime] = compile_for_inference(model)
    sites = list(compiled["pad"].site_gates)
    dense_c = compile_for_inference(dense, SHAPE)
    dense_flops = flops(dense_c, torch.zeros(1, *SHAPE))
    cases = [("", 1), ("", 64)] + [("skewed ", b) for b in (2, 8, 64)]  # skewed: half the inputs keep every token,
    arms: dict[tuple[int, str], Callable[[], object]] = {}  # half the CLS token alone (forced, gates idle)
    theory: dict[tuple[int, str], float] = {}
    executed: dict[tuple[int, str], float] = {}
    for case, batch in cases:
        x = torch.randn(batch, *SHAPE)
        forced = None
        if case:
            keep = torch.zeros(batch, 50, 1)
            keep[::2] = 1.0
            forced = dict.fromkeys(sites, keep)
        arms[(batch, f"{case}dense")] = lambda x=x: dense_c(x)
        theory[(batch, f"{case}dense")] = executed[(batch, f"{case}dense")] = 1.0
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run_forced(compiled["loop"], forced, x)  # each input's kept tokens only
        per_input = counter.get_total_flops() / batch
        for runtime in BATCH_RUNTIMES if batch > GROUP else ("pad", "loop") if batch > 1 else ("pad",):
            label = f"{case}token {runtime}" if batch > 1 else "token"
            arms[(batch, label)] = lambda m=compiled[runtime], f=forced, x=x: run_forced(m, f, x)
            theory[(batch, label)] = dense_flops / per_input
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                run_forced(compiled[runtime], forced, x)
            executed[(batch, label)] = dense_flops * batch / counter.get_total_flops()
    load_before = load()
    times = paired_times(arms, args.rounds)
    load_after = load()
    rows = []
    for (batch, label), ms in times.items():
        base = times[(batch, "skewed dense" if label.startswith("skewed") else "dense")]
        speedup = statistics.median(b / t for b, t in zip(base, ms, strict=True))
        rows.append({"batch": batch, "arm": label, "ms": round(statistics.median(ms), 4),
                     "ms_per_input": round(statistics.median(ms) / batch, 4), "speedup": round(speedup, 3),
                     "theoretical": round(theory[(batch, label)], 3),
                     "achieved_over_theoretical": round(speedup / theory[(batch, label)], 3),
                     "executed_flops_speedup": round(executed[(batch, label)], 3), "threads": 1,
                     "load_before": load_before, "load_after": load_after})
    header = (f"Compiled token-gated ViT (patch 4, dim {dim}, depth 6; token sites before blocks 1, 3, 4, each keeping "
              f"{args.keep} of the present patch tokens: kept fractions {[round(f, 3) for f in fractions]}) vs the "
              f"dense ViT, untrained weights. CPU: {platform.processor() or platform.machine()}, torch "
              f"{torch.__version__}, 1 thread; ms: median over {args.rounds} interleaved rounds, speedup: median of "
              f"the per-round ratios to dense. `skewed`: half the inputs keep every token, half the CLS token alone. "
              f"Load average (uptime) before: {load_before}; after: {load_after}.")
    stem = Path(args.out or RESULTS / ("token_latency" + (f"_dim{dim}" if dim != 96 else "")))
    write_csv(f"{stem}.csv", rows)
    table = to_markdown([{k: v for k, v in r.items() if not k.startswith("load")} for r in rows])
    atomic_write(f"{stem}.md", lambda f: f.write(f"# Token gating: measured latency\n\n{header}\n\n{table}"))
    print(header)
    print(table)


if __name__ == "__main__":
    main()
