"""Training single units in tests, without an engine: each unit gets an updater (scpl_kit.updater), as
an engine would give it, and `step` runs the unit's forward, losses and update on one batch."""

from __future__ import annotations

import weakref

import torch

from scpl_kit.methods.units import LocalUnit
from scpl_kit.signal import Signal
from scpl_kit.updater import OptimizerSettings, Updater, train_step, updaters_for

_updaters: "weakref.WeakKeyDictionary[LocalUnit, Updater]" = weakref.WeakKeyDictionary()


def attach(units: list[LocalUnit], lr: float = 1e-3, lr_min: float = 1e-5, steps: int = 100, **settings) -> list[Updater]:
    """Give `units` updaters (Adam, cosine from `lr` to `lr_min` over `steps`, unless told otherwise)."""
    made = updaters_for(units, OptimizerSettings(lr=lr, lr_min=lr_min, **settings), steps_per_epoch=steps, epochs=1)
    _updaters.update(zip(units, made))
    return made


def step(unit: LocalUnit, signal: Signal) -> tuple[Signal, dict[str, torch.Tensor]]:
    """One training step of `unit` on `signal` with its updater (attached first if it has none)."""
    if unit not in _updaters:
        attach([unit])
    return train_step(unit, _updaters[unit], signal)
