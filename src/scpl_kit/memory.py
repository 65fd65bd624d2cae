"""Peak activation memory of training work on the CPU, from PyTorch's profiler (the tables measure there:
the ratios between methods are what they compare, and they need no GPU).

The profiler records every allocation and free of tensor memory (`[memory]` records, with a size and
a nanosecond time); their running sum in time order is the memory held, and its maximum over the
measured steps the peak above what was held when they began. It sees the threads that run the work,
not oneDNN's internal scratch buffers.

A session starts one step before the measured ones (a warm-up step inside it, then a marker range,
`measured_from`). The profiler reports the free of a block with the size it noted when the block was
allocated under a profiler; a block allocated with no profiler running is freed unseen, or, when its
address last held a block allocated under an earlier session, with that block's stale size. A step
frees what the step before left (its output, its gradients), so measuring from a session's first step
counted those frees at sizes that depended on what ran before in the process: the same step measured
up to 4 MB apart. Inside the session the step before is profiled, and its blocks freed at their sizes.
(The ops' `self` memory at their start times was used before: it also moved an op's frees to its start,
hiding the peak within the op. The resident-set high-water mark was tried too: repeating the same
4-batch window in one BP process gave 270 to 346 MB, a spread as large as the differences the tables
are about. The profiler's event tree, which has addresses, crashed on the pipeline's two-thread profiles.)
"""

from __future__ import annotations

import bisect
import math
from itertools import accumulate
from typing import TYPE_CHECKING, Callable

import torch

from scpl_kit.signal import Signal

if TYPE_CHECKING:
    import torch.profiler

UNIT_SCOPE = "unit:"  # the profiler range each unit's training step runs in (updater.train_step): its memory is told apart
MEASURED_FROM = "measure:from"  # an empty profiler range: the measured steps start here; what ran before is warm-up


def mark_measured_from() -> None:
    """Mark, in the running profiler session, where the measured steps start."""
    with torch.profiler.record_function(MEASURED_FROM):
        pass


def peak_memory_mb(work: Callable[[], object], warmup: Callable[[], object]) -> float:
    """High-water mark (MB) of tensor memory allocated while `work()` runs, above its start, with
    `warmup()` (the same work before it) profiled too, so that what it leaves is freed at its size."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        warmup()
        mark_measured_from()
        work()
    return profiled_peaks_mb(prof)[0]


def kineto_events(prof: "torch.profiler.profile") -> list:
    """The session's raw records (nanosecond times). Read after torch has parsed them into its own events:
    left unparsed, the session crashed the process when the garbage collector freed it (a pipeline
    stage under load, several times in a row; parsed first, never)."""
    prof.events()
    return list(prof.profiler.kineto_results.events())


def measured_from_ns(events: list) -> int | None:
    """Where the measured steps start; None when the session ended before them (nothing measured)."""
    return next((event.start_ns() for event in events if event.name() == MEASURED_FROM), None)


def memory_levels(events: list) -> tuple[list[int], list[int]]:
    """(nanosecond times, tensor bytes held after each allocation or free), in time order, from the session's start."""
    changes = sorted(((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]"),
                     key=lambda change: change[0])  # stable: records of one nanosecond keep the order they were made in
    return [t for t, _ in changes], list(accumulate(change for _, change in changes))


def peak_above(times: list[int], levels: list[int], start: int, end: float = float("inf")) -> int:
    """The highest level between `start` and `end` (ns) above the level held at `start` (bytes)."""
    first, last = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
    before = levels[first - 1] if first else 0
    return max((level - before for level in levels[first:last]), default=0)


def profiled_peaks_mb(prof: "torch.profiler.profile") -> tuple[float, dict[str, float]]:
    """From a finished session's measured steps, read once: the high-water mark (MB) of tensor memory
    above their start (NaN when the session ended before them: an epoch of warm-up steps only), and
    each unit's within its own steps, above what was held when a step began (what earlier units left
    alive is theirs, not its), the largest over the session's steps."""
    events = kineto_events(prof)
    start = measured_from_ns(events)
    if start is None:
        return math.nan, {}
    times, levels = memory_levels(events)
    units: dict[str, float] = {}
    for event in events:
        if event.name().startswith(UNIT_SCOPE) and event.start_ns() >= start:
            name = event.name()[len(UNIT_SCOPE):]
            units[name] = max(units.get(name, 0.0), peak_above(times, levels, event.start_ns(), event.end_ns()) / 2**20)
    return max(0, peak_above(times, levels, start)) / 2**20, units


def unit_peak_memory(units: list, example: Signal) -> list[float]:
    """Each unit's peak activation memory (MB) over one training step on `example` (what the unit
    before hands it), with Adam: what one module needs alive, whichever engine or device it runs on.
    Measured on a second step, after a first one has made the optimizer's state (Adam's moments
    persist: they are the weights' memory, not the step's). The steps change the units' weights:
    measure on units built for the purpose."""
    from scpl_kit.updater import train_step, updaters_for

    peaks, signal = [], example
    for unit, updater in zip(units, updaters_for(units)):
        unit.train()
        holder: dict[str, Signal] = {}
        step = lambda: holder.update(out=train_step(unit, updater, signal)[0])  # noqa: E731
        peaks.append(peak_memory_mb(step, warmup=step))
        signal = holder["out"]
    return peaks
