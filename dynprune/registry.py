"""A tiny name -> factory registry shared by backbones and gates (timm-style ``@register``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories so configs and tests can enumerate every component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator adding ``fn`` under ``name``; a duplicate name is an error."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = fn
            return fn

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. a component a test registered for itself)."""
        if name not in self._items:
            raise ValueError(f"{self.kind} '{name}' is not registered")
        del self._items[name]

    def get(self, name: str) -> Callable[..., T]:
        """The factory for ``name``, or a ValueError listing the valid names."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)
