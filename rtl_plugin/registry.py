"""A small name -> object registry (decorator + lookup), shared by adapters, routers and partitioners."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """``@reg.register("name")`` stores a class or function; ``reg.get(name)`` looks it up.

    Args:
        kind: what is registered, for messages ("adapter", "router", ...).
        error: the exception class raised for unknown or duplicate names.
        set_name: also set ``obj.name = name`` on registration (classes whose instances report their name).
    """

    def __init__(self, kind: str, error: type[Exception], *, set_name: bool = False):
        self.kind = kind
        self.error = error
        self.set_name = set_name
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            old = self._items.get(name)
            if old is not None and old is not obj:
                raise self.error(f"a {self.kind} named {name!r} is already registered ({old.__name__}).")
            if self.set_name:
                obj.name = name
            self._items[name] = obj
            return obj
        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise self.error(f"unknown {self.kind} {name!r}; registered {self.kind}s: {self.names()}.")
        return self._items[name]

    def values(self) -> list[T]:
        return list(self._items.values())
