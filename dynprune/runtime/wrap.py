"""Executors replace a model's modules in place; third-party forward code still reads the attributes of the
module it knows (``conv.stride``, ``conv.padding``, ``block.layers``, ...), so an executor falls back to the
module it wraps for every attribute it does not have itself."""

from __future__ import annotations

from typing import Any

from torch import nn


class Wrapper(nn.Module):
    """An ``nn.Module`` whose unknown attributes resolve on its wrapped child (named by ``wrapped``)."""

    wrapped = "module"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__["_modules"].get(type(self).wrapped)
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)
