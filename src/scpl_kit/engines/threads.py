"""The SCPL paper's own schedule (methods.md §3): unit i on device `i % n`; within one batch, unit k's
loss/backward/step runs in a thread while unit k+1 already runs its forward on k's detached output.
Nothing overlaps across batches: all threads are joined before the next batch.

On GPUs every unit runs on a CUDA stream of its own: on the default stream, kernels queue one after
another whatever thread launched them, so unit k's backward could not overlap unit k+1's forward even
on one GPU. A hand-off orders the receiving stream after the producing one with an event (no host
wait), and at the end of the batch the device's default stream waits for every unit's stream, so the
loader's next batch, evaluation and checkpoints see finished weights.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import torch

from scpl_kit.engines import ENGINES
from scpl_kit.engines.base import InProcessEngine
from scpl_kit.methods.units import LocalUnit, UnitStep
from scpl_kit.signal import Signal
from scpl_kit.updater import UpdateRecipe, Updater

Stream = torch.cuda.Stream | None  # None: a CPU unit, whose work is ordered by its thread alone


@ENGINES.register("threads")
class ThreadsEngine(InProcessEngine):
    def __init__(self, devices: list[str] | None = None) -> None:
        """`devices: null` takes every GPU, or two CPU entries where there is none."""
        super().__init__(list(devices or [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu", "cpu"]))
        self.pool: ThreadPoolExecutor | None = None
        self.streams: list[Stream] = []

    def setup(self, units: list[LocalUnit], example: Signal | None = None, recipe: UpdateRecipe | None = None) -> None:
        super().setup(units, example, recipe)
        self.streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for device in map(self.device_of, range(len(units)))]

    @contextlib.contextmanager
    def epoch_scope(self) -> Iterator[None]:
        # A pool rather than a new thread per unit per batch (the paper's code): same schedule, no start-up cost.
        with ThreadPoolExecutor(max_workers=len(self.units)) as self.pool:
            yield

    def train_batch(self, signal: Signal) -> dict[str, torch.Tensor]:
        pending: list[Future] = []
        made_on = default_stream(self.device)  # the loader copied the batch on it
        for i, (unit, updater, stream) in enumerate(zip(self.units, self.updaters, self.streams)):
            signal = self.handed_over(signal, made_on, stream, self.device_of(i))
            with torch.cuda.stream(stream):
                step = updater.forward(unit, signal)
            pending.append(self.pool.submit(learn_on, stream, updater, unit, step))
            signal, made_on = step.handoff(), stream
        losses = {}
        for future in pending:
            losses.update(future.result())
        for stream in filter(None, self.streams):  # what runs next on the default stream sees this batch's updates
            default_stream(stream.device).wait_stream(stream)
        return losses

    def handed_over(self, signal: Signal, made_on: Stream, stream: Stream, device: torch.device) -> Signal:
        """`signal`, made on stream `made_on`, on `device` and ready for work on `stream`."""
        if stream is None:
            return self.transport.moved(signal, device)
        if made_on is not None:
            stream.wait_stream(made_on)  # an event: the GPU orders the two, the host does not wait
        # A copy between GPUs is ordered after the current streams of both devices: the producer's and ours.
        with torch.cuda.stream(made_on), torch.cuda.stream(stream):
            moved = self.transport.moved(signal, device)
        for tensor in moved.values():
            if tensor.is_cuda:
                tensor.record_stream(stream)  # made on another stream: the allocator must not reuse it before ours is done
        return moved


def default_stream(device: torch.device) -> Stream:
    return torch.cuda.default_stream(device) if device.type == "cuda" else None


def learn_on(stream: Stream, updater: Updater, unit: LocalUnit, step: UnitStep) -> dict[str, torch.Tensor]:
    """The unit's backward and update, queued on its stream (a thread's current stream is its own)."""
    with torch.cuda.stream(stream):
        return updater.learn(unit, step)
