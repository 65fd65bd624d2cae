"""One device, one batch at a time, units in order: the reference every other engine must match."""

from __future__ import annotations

import torch

from scpl_kit.engines import ENGINES
from scpl_kit.engines.base import InProcessEngine
from scpl_kit.signal import Signal
from scpl_kit.updater import train_step


@ENGINES.register("sequential")
class SequentialEngine(InProcessEngine):
    def __init__(self, device: str = "cpu") -> None:
        super().__init__([device])

    def train_batch(self, signal: Signal) -> dict[str, torch.Tensor]:
        losses = {}
        for unit, updater in zip(self.units, self.updaters):
            signal, unit_losses = train_step(unit, updater, signal)
            losses.update(unit_losses)
        return losses
