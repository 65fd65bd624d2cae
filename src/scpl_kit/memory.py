"""Peak activation memory of training work on the CPU, from PyTorch's profiler (the tables measure there:
the ratios between methods are what they compare, and they need no GPU).

The profiler attributes each allocation and free to the op that made it (`self` memory, so nested
ops are not counted twice) or, outside any op, to a `[memory]` event; their running sum in time
order is the memory held, and its maximum the peak above what was held before. It sees the threads
that run the work, not oneDNN's internal scratch buffers. (The resident-set high-water mark was tried
instead: repeating the same 4-batch window in one BP process gave 270 to 346 MB, a spread as large as
the differences the tables are about.)
"""

from __future__ import annotations

import bisect
from itertools import accumulate
from typing import TYPE_CHECKING, Callable

from scpl_kit.signal import Signal

if TYPE_CHECKING:
    import torch.profiler


def peak_memory_mb(work: Callable[[], object]) -> float:
    """High-water mark (MB) of tensor memory allocated while `work()` runs, above the start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    return profiled_peak_mb(prof)


UNIT_SCOPE = "unit:"  # the profiler range each unit's training step runs in (updater.train_step): its memory is told apart


def profiled_peak_mb(prof: "torch.profiler.profile") -> float:
    """The high-water mark (MB) of tensor memory over a finished profiler session, above its start."""
    _, levels = memory_levels(prof)
    return max(0, *levels) / 2**20


def memory_levels(prof: "torch.profiler.profile") -> tuple[list[int], list[int]]:
    """(times, tensor bytes held after each allocation or free), in time order, from the session's start."""
    changes = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage) for e in prof.events()
    )
    return [t for t, _ in changes], list(accumulate(change for _, change in changes))


def profiled_unit_peaks_mb(prof: "torch.profiler.profile") -> dict[str, float]:
    """Each unit's high-water mark (MB) within its own training steps, above what was held when a step
    began (what earlier units left alive is theirs, not its): the largest over the session's steps."""
    times, levels = memory_levels(prof)
    peaks: dict[str, float] = {}
    for event in prof.events():
        if not event.name.startswith(UNIT_SCOPE):
            continue
        first = bisect.bisect_left(times, event.time_range.start)
        last = bisect.bisect_right(times, event.time_range.end)
        before = levels[first - 1] if first else 0
        peak = max((level - before for level in levels[first:last]), default=0)
        name = event.name[len(UNIT_SCOPE):]
        peaks[name] = max(peaks.get(name, 0.0), peak / 2**20)
    return peaks


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
        train_step(unit, updater, signal)
        holder: dict[str, Signal] = {}
        peaks.append(peak_memory_mb(lambda: holder.update(out=train_step(unit, updater, signal)[0])))
        signal = holder["out"]
    return peaks
