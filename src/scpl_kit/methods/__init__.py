"""Training methods: each turns a BlockModel into a list of LocalUnits. Importing registers them all.

A method is one module with one registered builder `build(model, num_classes, **options)`; every
option is a key of conf/method/<name>.yaml. Two keys every method has are handled here, before the
builder sees the model: `modules` (K) and `cuts` regroup the model's layers into K blocks (the
gradient-isolated modules of a decoupled method; for BP, the places an engine such as gpipe may
split it), so no method needs to know how a model is cut.
"""

from __future__ import annotations

from typing import Any, Callable

from scpl_kit.models.base import BlockModel
from scpl_kit.methods.units import LocalUnit, NonFiniteLossError
from scpl_kit.registry import Registry

MethodBuilder = Callable[..., list[LocalUnit]]
METHODS: Registry[MethodBuilder] = Registry("method")


def build_units(name: str, model: BlockModel, num_classes: int, modules: int | None = None, cuts: list[int] | str | None = None,
                **options: Any) -> list[LocalUnit]:
    """`modules`/`cuts` (null: the model's own blocks; `cuts: balanced`: its memory-balanced ones) recut `model`
    in place, then `name`'s builder runs."""
    model.recut(modules, cuts)
    return METHODS.build(name, model, num_classes, **options)


def check_decouplable(method: str, model: BlockModel) -> None:
    """A decoupled method trains each block on its own, so a one-block model leaves it nothing to decouple."""
    if len(model.blocks) < 2:
        layers = len(model.layers())
        fix = f"cut it into 2..{layers} modules (method.modules)" if layers > 1 else "give it at least 2 layers (model.blocks)"
        raise ValueError(f"method {method} trains blocks separately, but the model has {len(model.blocks)} block; {fix} or use method=bp")


from scpl_kit.methods import al, auglocal, bp, cascade, contsup, deinforeg, dgl, early_exit, greedy_sl, infopro, predsim, scpl  # noqa: E402,F401  (register every method)

__all__ = ["METHODS", "LocalUnit", "NonFiniteLossError", "build_units", "check_decouplable"]
