"""Granularities by name (``list_granularities()``: ``channel``, ``block``, ``width``, ``neuron``, ``token``), one file
each, and the seam they share (:mod:`dynprune.granularity.base`): sites, input layouts, FLOPs terms, options, report
sections; each registers its runtime executor (:mod:`dynprune.runtime.executor`)."""

from __future__ import annotations

from dynprune.granularity import block, channel, head, neuron, token, width  # noqa: F401  (registers)
from dynprune.granularity.base import (
    GRANULARITIES,
    LAYOUTS,
    FlopsTerms,
    Granularity,
    Layout,
    ModuleGranularity,
    Site,
    TermBatch,
    create_granularity,
    layout_of,
    list_granularities,
    register_granularity,
    report_sections,
    resolve,
)

__all__ = ["GRANULARITIES", "LAYOUTS", "FlopsTerms", "Granularity", "Layout", "ModuleGranularity", "Site",
           "TermBatch", "create_granularity", "layout_of", "list_granularities", "register_granularity",
           "report_sections", "resolve"]
