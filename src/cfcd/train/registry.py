"""Name -> builder tables filled by a ``register`` decorator (samplers, optimizers, LR schedules).

A recipe names a builder (``data.sampler: tuple``, ``optim.name: sgd``, ``optim.policy: cos``);
the config check refuses names no table holds, naming the recipe key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from cfcd.errors import InputError

F = TypeVar("F", bound=Callable)


class Registry(dict):
    """``{name: builder}`` for the recipe key ``key`` (e.g. ``data.sampler``)."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self:
                raise ValueError(f"{self.key}: {name!r} is registered twice")
            self[name] = fn
            return fn

        return add

    def choices(self) -> str:
        names = list(self)  # registration order
        return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)

    def check(self, name) -> None:
        if name not in self:
            raise InputError(f"{self.key} must be {self.choices()}, got {name!r}")

    def build(self, name: str, *args, **kwargs):
        self.check(name)
        return self[name](*args, **kwargs)
