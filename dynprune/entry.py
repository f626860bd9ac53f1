"""The ``dynprune`` console script: ``fit|validate|test|predict`` go to the LightningCLI (``dynprune.cli``),
every other subcommand to the ``main(argv)`` its module names in :data:`SUBCOMMANDS`.

The table is the one place a new subcommand is added; modules are imported only when their subcommand runs,
so the CLI never imports the sweep runner or the benchmark harness (and they may import the CLI).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, str] = {
    "sweep": "dynprune.sweep:sweep_main",
    "bench": "dynprune.bench.cli:bench_main",
    "profile-latency": "dynprune.latency:profile_main",
}


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch ``dynprune <subcommand> ...``; anything not in :data:`SUBCOMMANDS` is a LightningCLI command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        module, function = SUBCOMMANDS[args[0]].split(":")
        getattr(importlib.import_module(module), function)(args[1:])
        return
    from dynprune.cli import main as cli_main

    cli_main(None if argv is None else args)


if __name__ == "__main__":
    main()
