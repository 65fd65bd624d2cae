"""One device, one batch at a time, units in order: the reference every other engine must match."""

from __future__ import annotations

from typing import Iterable

import torch

from scpl_kit.engines import ENGINES
from scpl_kit.engines.base import Batch, BatchCallback, Engine, LossMeter, ReadoutCollector, as_signal, batch_size, resolve_device
from scpl_kit.methods.units import LocalUnit, inference_route, moved
from scpl_kit.signal import Signal
from scpl_kit.updater import UpdateRecipe, train_step


class SequentialEngine(Engine):
    def __init__(self, device: str = "cpu") -> None:
        self.device = resolve_device(device)
        self.units, self.updaters = [], []

    def device_of(self, index: int) -> torch.device:
        """Where unit `index` runs (one device here; subclasses spread units over several)."""
        return self.device

    def setup(self, units: list[LocalUnit], example: Signal | None = None, recipe: UpdateRecipe | None = None) -> None:
        self.units = [unit.to(self.device_of(i)) for i, unit in enumerate(units)]
        self.attach_updaters(recipe)

    def train_epoch(self, batches: Iterable[Batch], on_batch: BatchCallback | None = None) -> dict[str, float]:
        meter = LossMeter()
        for unit in self.units:
            unit.train()
        for batch in batches:
            signal = moved(as_signal(batch), self.device)
            losses = {}
            for unit, updater in zip(self.units, self.updaters):
                signal, unit_losses = train_step(unit, updater, signal)
                losses.update(unit_losses)
            meter.add(losses)
            if on_batch is not None:
                on_batch(batch_size(signal))
        return meter.means()

    @torch.no_grad()
    def predict(self, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        for unit in self.units:
            unit.eval()
        route, collected = inference_route(self.units), ReadoutCollector()
        for batch in batches:
            signal = as_signal(batch, with_labels=False)
            for i, phase in route:
                signal = self.units[i].infer(moved(signal, self.device_of(i)), phase)
            collected.add(signal)
        return collected.result()


@ENGINES.register("sequential")
def sequential(device: str = "cpu") -> SequentialEngine:
    return SequentialEngine(device)
