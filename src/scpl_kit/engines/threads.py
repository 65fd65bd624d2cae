"""The SCPL paper's own schedule (methods.md §3): unit i on device `i % n`; within one batch, unit k's
loss/backward/step runs in a thread while unit k+1 already runs its forward on k's detached output.
Nothing overlaps across batches: all threads are joined before the next batch.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import torch

from scpl_kit.engines import ENGINES
from scpl_kit.engines.base import InProcessEngine
from scpl_kit.signal import Signal


@ENGINES.register("threads")
class ThreadsEngine(InProcessEngine):
    def __init__(self, devices: list[str] | None = None) -> None:
        """`devices: null` takes every GPU, or two CPU entries where there is none."""
        super().__init__(list(devices or [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu", "cpu"]))
        self.pool: ThreadPoolExecutor | None = None

    @contextlib.contextmanager
    def epoch_scope(self) -> Iterator[None]:
        # A pool rather than a new thread per unit per batch (the paper's code): same schedule, no start-up cost.
        with ThreadPoolExecutor(max_workers=len(self.units)) as self.pool:
            yield

    def train_batch(self, signal: Signal) -> dict[str, torch.Tensor]:
        pending: list[Future] = []
        for i, (unit, updater) in enumerate(zip(self.units, self.updaters)):
            step = updater.forward(unit, self.transport.moved(signal, self.device_of(i)))
            pending.append(self.pool.submit(updater.learn, unit, step))
            signal = step.handoff()
        losses = {}
        for future in pending:
            losses.update(future.result())
        return losses
