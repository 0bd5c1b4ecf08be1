"""One registry type for everything chosen by name: models, checkpoint formats, losses, samplers, optimizers,
learning-rate schedules.

A module that defines a thing registers it when imported (timm's pattern), so a new family, loss or
format is one file plus one import; an unknown name is an :class:`~cfcd.errors.InputError` that lists
the known ones (:meth:`Registry.get` for a name given in code or on the command line, :meth:`Registry.check`
worded for a recipe key).
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from cfcd.errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to things of one ``kind``; ``key`` normalises a name (e.g. case) before lookup."""

    def __init__(self, kind: str, *, key: Callable[[str], str] = str):
        self.kind = kind
        self._key = key
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None, *, replace: bool = False):
        """Add ``item`` under ``name``; without ``item``, a decorator. A taken name is refused unless
        ``replace`` (re-registering the same object is harmless: modules may be imported twice)."""

        def add(obj: T) -> T:
            k = self._key(name)
            if k in self._items and self._items[k] is not obj and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[k] = obj
            return obj

        return add if item is None else add(item)

    def unregister(self, name: str) -> None:
        self._items.pop(self._key(name), None)

    def get(self, name: str) -> T:
        k = self._key(str(name))
        if k not in self._items:
            raise InputError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[k]

    __getitem__ = get

    def names(self) -> list[str]:
        return sorted(self._items)

    def choices(self) -> str:
        """The names in registration order, as a sentence: ``a, b or c``."""
        names = list(self._items)
        return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)

    def check(self, name: str) -> None:
        """Refuse a name no entry has, worded for a recipe key (``kind`` = ``optim.name``, ...)."""
        if name not in self:
            raise InputError(f"{self.kind} must be {self.choices()}, got {name!r}")

    def build(self, name: str, *args, **kwargs):
        """Call the builder registered under ``name``."""
        self.check(name)
        return self._items[self._key(name)](*args, **kwargs)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
