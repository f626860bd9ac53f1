"""Real speed: compile a dense, statically pruned or gated model into one that skips the pruned compute, and measure
what its decisions cost on this machine (a latency lookup table for ``cost: latency``)."""

from dynprune.runtime.compile import CompiledModel, compile_for_inference
from dynprune.runtime.dispatch import Plan
from dynprune.runtime.fold import fold_batchnorm
from dynprune.runtime.profile import LatencyTable, profile_latency

__all__ = ["CompiledModel", "LatencyTable", "Plan", "compile_for_inference", "fold_batchnorm", "profile_latency"]
