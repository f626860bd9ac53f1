"""Per-call dispatch between the two exact ways of running a compiled gated model, so it is never slower than
the masked model it replaces.

- ``thin``: each executor computes only what its decisions keep (thin channels, sub-batches, prefix widths);
- ``masked``: each executor computes everything on the BN-folded weights and multiplies by (or selects with) the
  same decisions, as the masked training model does.

Both give the masked model's outputs (``compile_for_inference`` checks both). Which is faster depends on the
batch: the thin path saves compute but pays gathers and per-call bookkeeping, and at batch > 1 a channel is
computed when *any* input keeps it. :class:`Plan` holds, per batch-size bucket, the measured time of each path
and the path taken; a call of batch N runs the path of the bucket nearest to N (in log2; ties to the larger).
An executor module offers the masked path by defining ``set_masked(on: bool)``; one that does not always runs
its own (thin) way, which is still exact.
"""

from __future__ import annotations

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


@dataclass
class Bucket:
    """Measured milliseconds per call of each path at one batch size, and the one taken."""

    batch: int
    thin_ms: float
    masked_ms: float

    @property
    def path(self) -> str:
        """The faster path (``thin`` on a tie)."""
        return "masked" if self.masked_ms < self.thin_ms else "thin"


@dataclass
class Plan:
    """{batch size: :class:`Bucket`} measured at ``threads`` torch threads (which path wins depends on it: calibrate
    again to run at another count); with no bucket every call takes the thin path."""

    buckets: dict[int, Bucket] = field(default_factory=dict)
    threads: int = 1

    def path(self, batch: int) -> str:
        """The path a call of ``batch`` inputs takes: that of the nearest bucket in log2 (ties: the larger)."""
        if not self.buckets:
            return "thin"
        nearest = min(self.buckets, key=lambda b: (abs(math.log2(b) - math.log2(max(batch, 1))), -b))
        return self.buckets[nearest].path

    def rows(self) -> list[dict[str, float | int | str]]:
        """One row per bucket: batch, thin_ms, masked_ms, thin/masked time ratio, path."""
        return [{"batch": b.batch, "thin_ms": b.thin_ms, "masked_ms": b.masked_ms,
                 "thin_over_masked": b.thin_ms / b.masked_ms, "path": b.path}
                for b in sorted(self.buckets.values(), key=lambda b: b.batch)]

    def __str__(self) -> str:
        if not self.buckets:
            return "dispatch plan: not measured, every call takes the thin path"
        lines = [f"dispatch plan ({self.threads} thread(s)): batch, thin ms, masked ms -> path"]
        lines += [f"  {r['batch']:>4}  {r['thin_ms']:9.3f}  {r['masked_ms']:9.3f}  -> {r['path']}" for r in self.rows()]
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


def time_paths(run: Callable[[str, Tensor], Tensor], batches: Sequence[Tensor], rounds: int = 5,
               target_s: float = 0.01) -> dict[str, float]:
    """Median milliseconds per call of ``run(path, x)`` for each path, ``x`` cycling through ``batches``, timed in
    ``rounds`` interleaved rounds of ``torch.utils.benchmark.Timer`` blocks of about ``target_s`` seconds at the
    current thread count (process CPU time at 1 thread: on a shared machine it leaves out waits for a core)."""
    threads = torch.get_num_threads()
    clock = time.process_time if threads == 1 else time.perf_counter
    timers, numbers = {}, {}
    for path in PATHS:
        cycle = itertools.cycle(batches)
        timers[path] = benchmark.Timer("run(path, next(cycle))", globals={"run": run, "path": path, "cycle": cycle},
                                       num_threads=threads, timer=clock)
        timers[path].timeit(len(batches))  # warm: packed weights of these decisions cached, allocator
        once = timers[path].timeit(len(batches)).median
        numbers[path] = max(len(batches), int(target_s / max(once, 1e-6)))
    samples: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(rounds):
        for path in PATHS:
            samples[path].append(timers[path].timeit(numbers[path]).median)
    return {path: 1e3 * statistics.median(s) for path, s in samples.items()}


def measure(run: Callable[[str, Tensor], Tensor], example: Tensor, batch_sizes: Sequence[int],
            rounds: int = 5) -> Plan:
    """A :class:`Plan` with one measured bucket per batch size, the inputs taken from ``example`` (N, ...)."""
    plan = Plan(threads=torch.get_num_threads())
    for batch in batch_sizes:
        ms = time_paths(run, batches_of(example, batch), rounds)
        plan.buckets[batch] = Bucket(batch, ms["thin"], ms["masked"])
    return plan
