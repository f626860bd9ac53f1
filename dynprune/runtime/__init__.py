"""Real speed: compile a dense, statically pruned or gated model into one that skips the pruned compute."""

from dynprune.runtime.compile import CompiledModel, compile_for_inference
from dynprune.runtime.fold import fold_batchnorm

__all__ = ["CompiledModel", "compile_for_inference", "fold_batchnorm"]
