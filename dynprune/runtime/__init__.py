"""Real speed: compile a dense, statically pruned or gated model into one that skips the pruned compute.

``compile_for_inference`` and ``CompiledModel`` are imported on first use: granularity files import their
executors from this package, and the compiler imports the granularities.
"""

from dynprune.runtime.fold import fold_batchnorm

__all__ = ["CompiledModel", "compile_for_inference", "fold_batchnorm"]


def __getattr__(name: str) -> object:
    """``compile_for_inference`` and ``CompiledModel`` from :mod:`dynprune.runtime.compile`."""
    if name in ("CompiledModel", "compile_for_inference"):
        from dynprune.runtime import compile as compiler

        return getattr(compiler, name)
    raise AttributeError(f"module 'dynprune.runtime' has no attribute '{name}'")
