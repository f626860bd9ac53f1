"""The executor contract: how ``compile_for_inference`` runs the sites of one granularity for real.

Each granularity registers one (``Granularity.executor``), so the compiler never names a granularity. It
builds a compiled model in three passes over every site: BatchNorm folding leaves the modules ``keep`` names;
the layers ``gated`` or ``narrowed`` names become :class:`~dynprune.runtime.channels.ThinLayer` objects (a layer
narrowed by several sites keeps what all of them keep); then ``wrap`` may put an executor module at the
site's path (inner sites first, so outer paths stay valid); ``replace`` may swap several modules at once; last,
``finish`` sees the whole network with all of the granularity's sites (for decisions that reach past their own
module, e.g. tokens dropped for later blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from dynprune.gates.base import Gate

if TYPE_CHECKING:
    from dynprune.granularity.base import Site


class Executor:
    """Runs one granularity's sites; the defaults do nothing (override what the granularity needs)."""

    def keep(self, site: Site) -> set[str]:
        """Module paths that BatchNorm folding must leave in place (e.g. a block that is wrapped later)."""
        return set()

    def gated(self, site: Site, gate: Gate) -> dict[str, Gate]:
        """{layer path: gate} for the conv/linear layers that run on the output channels a gate decides from the
        layer's own input."""
        return {}

    def narrowed(self, site: Site) -> dict[str, Any]:
        """{layer path: slot} for the layers that run on the output channels the site's wrapper decided (a slot
        has ``mask() -> (N, C)`` bools, e.g. :class:`~dynprune.runtime.widths.WidthSlot`)."""
        return {}

    def replace(self, site: Site, gate: Gate, module: Callable[[str], nn.Module]) -> dict[str, nn.Module]:
        """{module path: its replacement} for the modules that run the site together (e.g. an MLP's fc1 and the fc2
        reading its thin output); ``module(path)`` gives the compiled network's module at ``path``. Applied
        before :meth:`wrap`, inner sites first."""
        return {}

    def wrap(self, module: nn.Module, site: Site, gate: Gate, inner: list[Gate],
             slots: dict[str, Any]) -> nn.Module | None:
        """The module that replaces the site's ``module`` (None: it stays); ``inner`` are the gates of the sites
        inside it, ``slots`` what :meth:`narrowed` returned for this site."""
        return None

    def finish(self, net: nn.Module, sites: dict[str, Site], gates: dict[str, Gate]) -> None:
        """A last pass over the compiled ``net`` with all of this executor's ``sites`` and their ``gates`` (e.g. to
        run the blocks after a token site on the kept tokens); nothing by default."""
