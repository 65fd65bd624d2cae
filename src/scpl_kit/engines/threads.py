"""The SCPL paper's own schedule (methods.md §3): unit i on device `i % n`; within one batch, unit k's
loss/backward/step runs in a thread while unit k+1 already runs its forward on k's detached output.
Nothing overlaps across batches: all threads are joined before the next batch.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

import torch

from scpl_kit.engines import ENGINES
from scpl_kit.engines.base import Batch, BatchCallback, LossMeter, as_signal, batch_size, resolve_device
from scpl_kit.engines.sequential import SequentialEngine
from scpl_kit.methods.units import moved


class ThreadsEngine(SequentialEngine):
    """The sequential engine's placement and inference, with the paper's threaded training step."""

    def __init__(self, devices: list[str]) -> None:
        if not devices:
            raise ValueError("the threads engine needs at least one device, e.g. devices: [cpu, cpu] or [cuda:0, cuda:1]")
        self.devices = [resolve_device(d) for d in devices]
        self.units, self.updaters = [], []

    def device_of(self, index: int) -> torch.device:
        return self.devices[index % len(self.devices)]

    def train_epoch(self, batches: Iterable[Batch], on_batch: BatchCallback | None = None) -> dict[str, float]:
        meter = LossMeter()
        for unit in self.units:
            unit.train()
        # A pool rather than a new thread per unit per batch (the paper's code): same schedule, no start-up cost.
        with ThreadPoolExecutor(max_workers=len(self.units)) as pool:
            for batch in batches:
                pending: list[Future] = []
                signal = as_signal(batch)
                for i, (unit, updater) in enumerate(zip(self.units, self.updaters)):
                    step = updater.forward(unit, moved(signal, self.device_of(i)))
                    pending.append(pool.submit(updater.learn, unit, step))
                    signal = step.handoff()
                losses = {}
                for future in pending:
                    losses.update(future.result())
                meter.add(losses)
                if on_batch is not None:
                    on_batch(batch_size(signal))
        return meter.means()


@ENGINES.register("threads")
def threads(devices: list[str] | None = None) -> ThreadsEngine:
    """`devices: null` takes every GPU, or two CPU entries where there is none."""
    if not devices:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu", "cpu"]
    return ThreadsEngine(list(devices))
