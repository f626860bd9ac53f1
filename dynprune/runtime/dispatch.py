"""Per-call dispatch between the exact ways of running a compiled model, so it is never slower than the masked
model it replaces, and each batch size runs in the memory layout that is faster for it.

Paths (of a gated model):

- ``thin``: each executor computes only what its decisions keep (thin channels, sub-batches, prefix widths);
- ``masked``: each executor computes everything on the BN-folded weights and multiplies by (or selects with) the
  same decisions, as the masked training model does.

Layouts (of image inputs, any compiled model): ``contiguous`` (NCHW) or ``channels_last`` (NHWC, which oneDNN runs
faster on large images and odd channel counts: ResNet-50 at 224x224 with channel gates, 53 -> 46 ms at batch 1 on
one CPU thread; tiny 28x28 convolutions are faster NCHW).

All give the masked model's outputs (``compile_for_inference`` checks every path in every layout). Which is faster
depends on the batch: the thin path saves compute but pays gathers and per-call bookkeeping, and at batch > 1 a
channel is computed when *any* input keeps it. :class:`Plan` holds, per batch-size bucket, the measured time of
each path and layout and the ones taken; a call of batch N runs those of the bucket nearest to N (in log2; ties to
the larger). An executor module offers the masked path by defining ``set_masked(on: bool)``; one that does not
always runs its own (thin) way, which is still exact.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils import benchmark

PATHS = ("thin", "masked")
LAYOUTS = ("contiguous", "channels_last")


def layouts_for(x: Tensor) -> tuple[str, ...]:
    """The memory layouts inputs like ``x`` can run in: both for images (N, C, H, W), else contiguous only."""
    return LAYOUTS if x.dim() == 4 else LAYOUTS[:1]


@dataclass
class Bucket:
    """Measured milliseconds per call of each path at one batch size (in the contiguous layout), of the faster
    path in each layout timed, and the ones taken."""

    batch: int
    thin_ms: float
    masked_ms: float
    layout_ms: dict[str, float] = field(default_factory=dict)
    """{layout: ms per call of :attr:`path` in it}; empty: only the contiguous layout (non-image inputs)."""

    @property
    def path(self) -> str:
        """The faster path (``thin`` on a tie)."""
        return "masked" if self.masked_ms < self.thin_ms else "thin"

    @property
    def layout(self) -> str:
        """The faster memory layout (``contiguous`` on a tie or when it alone was timed)."""
        return min(LAYOUTS, key=lambda layout: self.layout_ms.get(layout, math.inf if self.layout_ms else 0.0))


@dataclass
class Plan:
    """{batch size: :class:`Bucket`} measured at ``threads`` torch threads (which path wins depends on it: calibrate
    again to run at another count); with no bucket every call takes the thin path."""

    buckets: dict[int, Bucket] = field(default_factory=dict)
    threads: int = 1

    def nearest(self, batch: int) -> Bucket | None:
        """The bucket nearest to ``batch`` in log2 (ties: the larger); None without buckets."""
        if not self.buckets:
            return None
        return self.buckets[min(self.buckets, key=lambda b: (abs(math.log2(b) - math.log2(max(batch, 1))), -b))]

    def path(self, batch: int) -> str:
        """The path a call of ``batch`` inputs takes: that of the nearest bucket (``thin`` without buckets)."""
        bucket = self.nearest(batch)
        return "thin" if bucket is None else bucket.path

    def layout(self, batch: int) -> str:
        """The memory layout a call of ``batch`` inputs runs in: that of the nearest bucket (``contiguous`` without
        buckets)."""
        bucket = self.nearest(batch)
        return "contiguous" if bucket is None else bucket.layout

    def rows(self) -> list[dict[str, float | int | str]]:
        """One row per bucket: batch, thin_ms, masked_ms, thin/masked time ratio, path, the ms per layout timed
        (``<layout>_ms``) and the layout taken."""
        return [{"batch": b.batch, "thin_ms": b.thin_ms, "masked_ms": b.masked_ms,
                 "thin_over_masked": b.thin_ms / b.masked_ms, "path": b.path,
                 **{f"{layout}_ms": ms for layout, ms in b.layout_ms.items()}, "layout": b.layout}
                for b in sorted(self.buckets.values(), key=lambda b: b.batch)]

    def __str__(self) -> str:
        if not self.buckets:
            return "dispatch plan: not measured, every call takes the thin path in the contiguous layout"
        lines = [f"dispatch plan ({self.threads} thread(s)): batch, thin ms, masked ms (NCHW); that path's ms NCHW, "
                 "channels-last (timed again, interleaved) -> path, layout"]
        lines += [f"  {r['batch']:>4}  {r['thin_ms']:9.3f}  {r['masked_ms']:9.3f};  "
                  f"{r.get('contiguous_ms', float('nan')):9.3f}  {r.get('channels_last_ms', float('nan')):9.3f}  "
                  f"-> {r['path']}, {r['layout']}" for r in self.rows()]
        return "\n".join(lines)


def batches_of(example: Tensor, batch: int, count: int = 8) -> list[Tensor]:
    """Up to ``count`` consecutive batches (batch, ...) from ``example`` (N, ...), cycled when N < batch: the
    thin path's cost depends on how the decisions vary between calls, so they are timed on different inputs."""
    if batch < 1:
        raise ValueError(f"a dispatch batch size must be >= 1, got {batch}")
    n = min(count, max(1, len(example) // batch))
    need = n * batch
    reps = -(-need // len(example))
    pool = example.repeat(reps, *[1] * (example.dim() - 1))[:need] if reps > 1 else example[:need]
    return list(pool.split(batch))


def time_routes(routes: dict[str, Callable[[Tensor], Tensor]], batches: Sequence[Tensor], rounds: int = 5,
                target_s: float = 0.01) -> dict[str, float]:
    """Median milliseconds per call of each route ``run(x)``, ``x`` cycling through ``batches``, timed in ``rounds``
    interleaved rounds of ``torch.utils.benchmark.Timer`` blocks of about ``target_s`` seconds at the current thread
    count (process CPU time at 1 thread: on a shared machine it leaves out waits for a core)."""
    threads = torch.get_num_threads()
    clock = time.process_time if threads == 1 else time.perf_counter
    timers, numbers = {}, {}
    for name, run in routes.items():
        cycle = itertools.cycle(batches)
        timers[name] = benchmark.Timer("run(next(cycle))", globals={"run": run, "cycle": cycle},
                                       num_threads=threads, timer=clock)
        timers[name].timeit(len(batches))  # warm: packed weights of these decisions cached, allocator
        once = timers[name].timeit(len(batches)).median
        numbers[name] = max(len(batches), int(target_s / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(rounds):
        for name in routes:
            samples[name].append(timers[name].timeit(numbers[name]).median)
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def measure(run: Callable[[str, str, Tensor], Tensor], example: Tensor, batch_sizes: Sequence[int],
            rounds: int = 5, paths: Sequence[str] = PATHS) -> Plan:
    """A :class:`Plan` with one measured bucket per batch size, the inputs taken from ``example`` (N, ...):
    ``run(path, layout, x)`` is timed for each of ``paths`` in the contiguous layout, then, for image inputs
    (N, C, H, W), the faster path in each layout. A model with one path gives ``paths=("thin",)``."""
    plan = Plan(threads=torch.get_num_threads())
    layouts = layouts_for(example)
    for batch in batch_sizes:
        batches = batches_of(example, batch)
        ms = time_routes({path: functools.partial(run, path, LAYOUTS[0]) for path in paths}, batches, rounds)
        bucket = Bucket(batch, ms[paths[0]], ms.get("masked", ms[paths[0]]))
        if len(layouts) > 1:
            bucket.layout_ms = time_routes({layout: functools.partial(run, bucket.path, layout) for layout in layouts},
                                           batches, rounds)
        plan.buckets[batch] = bucket
    return plan
