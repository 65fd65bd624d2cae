"""Training methods: each turns a BlockModel into a list of LocalUnits. Importing registers them all.

A method is one module with one registered builder `build(model, num_classes, **options)`; every
option is a key of conf/method/<name>.yaml.
"""

from __future__ import annotations

from typing import Any, Callable

from scpl_kit.models.base import BlockModel
from scpl_kit.methods.units import LocalUnit, NonFiniteLossError
from scpl_kit.registry import Registry

MethodBuilder = Callable[..., list[LocalUnit]]
METHODS: Registry[MethodBuilder] = Registry("method")


def build_units(name: str, model: BlockModel, num_classes: int, **options: Any) -> list[LocalUnit]:
    return METHODS.build(name, model, num_classes, **options)


def check_decouplable(method: str, model: BlockModel) -> None:
    """A decoupled method trains each block on its own, so a one-block model leaves it nothing to decouple."""
    if len(model.blocks) < 2:
        raise ValueError(
            f"method {method} trains blocks separately, but the model has {len(model.blocks)} block; "
            "give it at least 2 blocks (model.blocks) or use method=bp"
        )


from scpl_kit.methods import al, bp, early_exit, scpl  # noqa: E402,F401  (register every method)

__all__ = ["METHODS", "LocalUnit", "NonFiniteLossError", "build_units", "check_decouplable"]
