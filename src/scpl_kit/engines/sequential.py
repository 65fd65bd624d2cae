"""One device, one batch at a time, units in order: the reference every other engine must match."""

from __future__ import annotations

from typing import Iterable

import torch

from scpl_kit.engines import ENGINES
from scpl_kit.engines.base import Batch, BatchCallback, Engine, LossMeter, resolve_device
from scpl_kit.methods.units import LocalUnit


class SequentialEngine(Engine):
    def __init__(self, device: str = "cpu") -> None:
        self.device = resolve_device(device)
        self.units = []

    def device_of(self, index: int) -> torch.device:
        """Where unit `index` runs (one device here; subclasses spread units over several)."""
        return self.device

    def setup(self, units: list[LocalUnit]) -> None:
        self.units = [unit.to(self.device_of(i)) for i, unit in enumerate(units)]

    def train_epoch(self, batches: Iterable[Batch], on_batch: BatchCallback | None = None) -> dict[str, float]:
        meter = LossMeter()
        for unit in self.units:
            unit.train()
        for inputs, labels in batches:
            h, labels = inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            losses = {}
            for unit in self.units:
                h, unit_losses = unit.train_step(h, labels)
                losses.update(unit_losses)
            meter.add(losses)
            if on_batch is not None:
                on_batch(len(labels))
        return meter.means()

    @torch.no_grad()
    def predict(self, batches: Iterable[Batch]) -> torch.Tensor:
        for unit in self.units:
            unit.eval()
        scores = []
        for inputs, _ in batches:
            h = inputs
            for i, unit in enumerate(self.units):
                h = unit.infer(h.to(self.device_of(i), non_blocking=True))
            scores.append(h.float().cpu())
        return torch.cat(scores)


@ENGINES.register("sequential")
def sequential(device: str = "cpu") -> SequentialEngine:
    return SequentialEngine(device)
