"""The fair benchmark harness (``dynprune bench``): a YAML protocol of arms, ratios, seeds and epochs, run
point by point with the same teacher, FLOPs, budget and selection rule for every arm, and a table with
Welch tests against the strongest baseline. See DESIGN.md, "The benchmark protocol"."""

from dynprune.bench.config import (
    Arm,
    BenchConfig,
    BenchConfigError,
    FairnessError,
    Point,
    check_fairness,
    load_config,
    parse_config,
)
from dynprune.bench.run import run_point, search_scale, search_width
from dynprune.bench.table import aggregate, welch_p, write_outputs

__all__ = [
    "Arm", "BenchConfig", "BenchConfigError", "FairnessError", "Point", "aggregate", "check_fairness", "load_config",
    "parse_config", "run_point", "search_scale", "search_width", "welch_p", "write_outputs",
]
