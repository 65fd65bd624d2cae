"""Measurement inside a run (`trainer.measure: true`): each training step's wall time and this
process's peak memory, taken by the one batch loop every engine shares, and logged with the epoch's
record (MLflow `time/...`, `memory/...`). Benchmarks read these instead of instrumenting engines.

Time: the interval between one step's completion and the next's, with the device synchronised at
each (CUDA runs asynchronously: without it the clock would time the queueing), so a stage that waits
for its input pays for the wait, as it does in a pipeline. The `warmup` steps (at least one), the profiled ones
(CPU) after them and one more (SETTLE) are not timed. Memory: on CUDA, torch.cuda.max_memory_allocated over the
epoch; on the CPU, the profiler's high-water mark of tensor memory over `memory_steps` steps after
the warm-up (above what was held before them: activations, gradients, optimizer temporaries, buffers
sent or received), in one profiler session, which slows those steps, so they are left out of the timing;
and, from the same session, each unit's peak within its own steps (`memory/unit/<name>/peak_mb`: the
memory one module needs, whichever engine runs it; CUDA keeps one peak per device, so there only the
process's).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
import torch.profiler

from scpl_kit.engines.balance import synchronize
from scpl_kit.memory import mark_measured_from, profiled_peaks_mb

MEMORY_STEPS = 4  # CPU: steps profiled for memory (a step's peak barely varies; the profiler is slow)
# Steps not timed after the profiled ones: each process reads its profile when it stops (a second or
# more), and a process waiting on a peer that is still reading would time that wait (a pipeline's
# first stage waits at most one step: then both run in step again).
SETTLE = 1


class StepMeasure:
    def __init__(self, device: torch.device, memory_steps: int = MEMORY_STEPS, warmup: int = 1) -> None:
        """`warmup`: the first steps, neither measured nor timed (at least one: lazily made state, such
        as Adam's moments, is the weights' memory, not a step's; and the first timed interval starts
        where the step before ends). The last of them runs inside the profiler session, before its
        marker (memory.py says why)."""
        self.device, self.warmup = device, max(warmup, 1)
        self.memory_steps = memory_steps if device.type == "cpu" else 0  # CUDA reads its allocator's peak instead
        self.start_epoch()

    def start_epoch(self) -> None:
        self.intervals: list[float] = []
        self.samples = 0  # in the timed steps
        self.peak_mb = math.nan  # not measured (CPU without profiled steps)
        self.unit_peaks_mb: dict[str, float] = {}
        self.steps = 0
        self.last = 0.0
        self.profiler: torch.profiler.profile | None = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def step(self, work: Callable[[], dict[str, torch.Tensor]], samples: int) -> dict[str, torch.Tensor]:
        """Run one training step (`work`), measuring it. The profiled steps run in one profiler session
        (starting and stopping it around each step, while a pipeline's receiving thread runs, can crash it)."""
        if self.steps == self.warmup - 1 and self.memory_steps:  # the last warm-up step is profiled too (memory.py says why)
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.profiler.__enter__()
        if self.steps == self.warmup and self.profiler is not None:
            mark_measured_from()
        losses = work()
        synchronize(self.device)
        now = time.perf_counter()
        if self.steps >= self.warmup + self.memory_steps + (SETTLE if self.memory_steps else 0):
            self.intervals.append(now - self.last)
            self.samples += samples
        self.last, self.steps = now, self.steps + 1
        if self.steps == self.warmup + self.memory_steps and self.profiler is not None:
            self._stop_profiler()
            self.last = time.perf_counter()  # the profiler's own work stays out of the next interval
        return losses

    def _stop_profiler(self) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.peak_mb, self.unit_peaks_mb = profiled_peaks_mb(self.profiler)
            self.profiler = None

    def stats(self) -> dict[str, float]:
        """This process's median step time, steady samples/s and peak memory in the epoch (NaN: no timed
        step), and on the CPU each of its units' peak within its own steps (`unit/<name>`)."""
        self._stop_profiler()  # an epoch shorter than the profiled steps
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        timed = sum(self.intervals)
        return {
            "step_s": statistics.median(self.intervals) if self.intervals else float("nan"),
            # A process that reads no samples (a later stage of BP's pipeline) has no pace of its own.
            "samples_per_s": self.samples / timed if timed and self.samples else float("nan"),
            "peak_mb": self.peak_mb,
            **{f"unit/{name}": peak for name, peak in self.unit_peaks_mb.items()},
        }


def job_stats(per_process: list[dict[str, float]]) -> dict[str, float]:
    """The epoch's measurements over the job's processes (in rank order): each process's, and the
    job's: the slowest process's samples/s (the pace every process of a synchronous engine keeps; an
    asynchronous engine's workers add up instead) and the largest peak memory (the device to size)."""
    paces = [p["samples_per_s"] for p in per_process if not math.isnan(p["samples_per_s"])]
    peaks = [p["peak_mb"] for p in per_process if not math.isnan(p["peak_mb"])]
    stats = {"time/samples_per_s": min(paces, default=math.nan), "memory/peak_mb": max(peaks, default=math.nan),
             "time/step_s": max(p["step_s"] for p in per_process)}
    for p in per_process:  # a unit trains in one process (pipelines), or alike in every replica (data parallel): the largest
        for key, peak in p.items():
            if key.startswith("unit/"):
                name = f"memory/{key}/peak_mb"
                stats[name] = max(stats.get(name, 0.0), peak)
    if len(per_process) > 1:
        for rank, p in enumerate(per_process):
            stats.update({f"time/rank{rank}/samples_per_s": p["samples_per_s"], f"memory/rank{rank}/peak_mb": p["peak_mb"]})
    return stats
