"""Training methods: each turns a BlockModel into a list of LocalUnits. Importing registers them all."""

from __future__ import annotations

from typing import Any, Callable

from scpl_kit.models.base import BlockModel
from scpl_kit.methods.units import LocalUnit, NonFiniteLossError
from scpl_kit.registry import Registry

MethodBuilder = Callable[..., list[LocalUnit]]
METHODS: Registry[MethodBuilder] = Registry("method")


def build_units(name: str, model: BlockModel, **options: Any) -> list[LocalUnit]:
    return METHODS.get(name)(model, **options)


from scpl_kit.methods import bp, scpl  # noqa: E402,F401  (register "bp", "scpl")

__all__ = ["METHODS", "LocalUnit", "NonFiniteLossError", "build_units"]
