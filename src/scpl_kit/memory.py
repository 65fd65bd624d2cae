"""Peak activation memory of training work on the CPU, from PyTorch's profiler (the tables measure there:
the ratios between methods are what they compare, and they need no GPU).

The profiler records every allocation and free of tensor memory with its address, size and a
nanosecond time; their running sum in time order is the memory held, and its maximum the peak above
what was held before. It sees the threads that run the work, not oneDNN's internal scratch buffers.
(The ops' `self` memory at their start times was used before: it moved an op's frees to its start,
hiding the peak inside the op, and counted frees of blocks allocated before the session, so the same
step measured up to 4 MB apart from one session to the next. The resident-set high-water mark was
tried too: repeating the same 4-batch window in one BP process gave 270 to 346 MB, a spread as large
as the differences the tables are about.)
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Callable, Iterator

from torch._C._profiler import _EventType

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
    """(nanosecond times, tensor bytes held after each allocation or free), in time order, from the session's start.
    A free counts only when the session saw the block allocated: the profiler also reports frees of
    older blocks (with a size it remembers for the address from an earlier session, stale once the
    address was reused), which made a step's peak 2 MB low after some histories and not after others."""
    allocations = sorted((event for event in events(prof) if event.tag == _EventType.Allocation), key=lambda event: event.start_time_ns)
    times, levels, live, held = [], [], set(), 0
    for allocation in allocations:
        block = allocation.extra_fields
        if block.device.type != "cpu":
            continue
        if block.alloc_size > 0:
            live.add(block.ptr)
        elif block.ptr in live:
            live.remove(block.ptr)
        else:
            continue
        held += block.alloc_size
        times.append(allocation.start_time_ns)
        levels.append(held)
    return times, levels


def events(prof: "torch.profiler.profile") -> Iterator:
    """Every event of a finished session (ops, ranges, allocations), each thread's tree walked depth first.
    The event tree is torch's own private API (torch.profiler._memory_profiler reads it too): the public
    event lists give allocations no address, and frees cannot be matched to them without one."""
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        yield event
        stack.extend(event.children)


def profiled_unit_peaks_mb(prof: "torch.profiler.profile") -> dict[str, float]:
    """Each unit's high-water mark (MB) within its own training steps, above what was held when a step
    began (what earlier units left alive is theirs, not its): the largest over the session's steps."""
    times, levels = memory_levels(prof)
    peaks: dict[str, float] = {}
    for event in events(prof):
        if event.tag == _EventType.Allocation or not event.name.startswith(UNIT_SCOPE):
            continue
        first = bisect.bisect_left(times, event.start_time_ns)
        last = bisect.bisect_right(times, event.end_time_ns)
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
