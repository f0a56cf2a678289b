"""Name -> factory registries with one factory signature each.

Extension: ``REGISTRY.register(name, config_cls, factory)`` at import time of the module that
defines the factory. Unknown or duplicate names raise ``RegistryError`` listing what exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from tiermem.errors import RegistryError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered implementation: its name, config class and factory."""

    name: str
    config_cls: type
    factory: F


class Registry(Generic[F]):
    """A named set of factories, e.g. every tier kind or every eviction policy."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, config_cls: type, factory: F) -> None:
        if name in self._entries:
            raise RegistryError(f"{self.what} registry: {name!r} is already registered")
        self._entries[name] = Entry(name, config_cls, factory)

    def get(self, name: str) -> Entry[F]:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(
                f"{self.what} registry: unknown {self.what} {name!r}; registered: {self.names()}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
