"""Name → builder registries, so a new model, method, dataset or engine is one decorated function."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T", bound=Callable)


class UnknownNameError(KeyError):
    """A name that no registry entry answers to; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownOptionError(ValueError):
    """A config key the chosen builder does not take; the message lists the ones it does."""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(fn: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def build(self, name: str, *args: Any, **options: Any) -> Any:
        """Call `name`'s builder with `args` (what the caller supplies: a model, the number of classes)
        and `options` (config keys). An option the builder does not take is named in one line with the
        ones it does, not as Python's TypeError about an unexpected keyword."""
        builder = self.get(name)
        parameters = inspect.signature(builder).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            valid = list(parameters)[len(args):]
            unknown = sorted(set(options) - set(valid))
            if unknown:
                raise UnknownOptionError(
                    f"{self.kind} {name!r} has no option {', '.join(map(repr, unknown))}; valid options: {', '.join(valid) or 'none'}"
                )
        return builder(*args, **options)
