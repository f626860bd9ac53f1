"""The granularities' extra training terms, as the task asks for them: every granularity the model has is called
through :meth:`Granularity.training_terms`, none by name; a term weight set for a granularity the model lacks is an
error."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from torch import Tensor, nn

from dynprune.checks import check_number
from dynprune.granularity.base import GRANULARITIES, Granularity, TermBatch


class TrainingTerms:
    """The training terms of the granularities of ``model`` (its ``model.dynprune`` sites; none if it is not gated),
    weighted by the task arguments ``settings``; ``side_pass(model)`` gives a context for extra forward passes."""

    def __init__(self, model: nn.Module, settings: Mapping[str, Any],
                 side_pass: Callable[[nn.Module], AbstractContextManager[None]]) -> None:
        info = getattr(model, "dynprune", None)
        self.granularities: dict[str, Granularity] = {}  # the instances (with their options) that made the sites
        for site in info.sites.values() if info is not None else ():
            self.granularities.setdefault(site.granularity, site.owner)
        for name in GRANULARITIES.names():
            for weight in GRANULARITIES.get(name).term_weights:
                check_number(weight, settings[weight], 0)
                if settings[weight] > 0 and name not in self.granularities:
                    raise ValueError(f"{weight} needs {name} sites: set granularity='{name}' (or include it)")
        self.model, self.settings, self.side_pass = model, settings, side_pass

    @staticmethod
    def weights() -> set[str]:
        """The task arguments that weight some registered granularity's terms."""
        return {w for name in GRANULARITIES.names() for w in GRANULARITIES.get(name).term_weights}

    def batch(self, x: Tensor, y: Tensor, granularity: str) -> TermBatch:
        """What ``granularity``'s terms read, after the training forward pass of x (N, ...) with labels y (N,)."""
        sites = {n: s for n, s in self.model.dynprune.sites.items() if s.granularity == granularity}
        gates = {n: self.model.get_submodule(s.gate_path) for n, s in sites.items()}
        return TermBatch(self.model, x, y, sites, gates, self.settings, lambda: self.side_pass(self.model))

    def __call__(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """{term name: weighted scalar} of every granularity of the model."""
        terms: dict[str, Tensor] = {}
        for name, granularity in self.granularities.items():
            terms.update(granularity.training_terms(self.batch(x, y, name)))
        return terms
