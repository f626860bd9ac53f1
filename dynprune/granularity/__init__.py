"""Granularities by name (``channel``, ``block``, ``width``); ``list_granularities()``."""

from __future__ import annotations

from dynprune.granularity import block, channel, width  # noqa: F401  (registers)
from dynprune.granularity.base import (
    GRANULARITIES,
    Granularity,
    Site,
    TermBatch,
    list_granularities,
    register_granularity,
    resolve,
)

__all__ = ["GRANULARITIES", "Granularity", "Site", "TermBatch", "list_granularities", "register_granularity",
           "resolve"]
