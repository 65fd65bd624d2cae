"""Stage balancing, shared by the engines that split units (or blocks) over processes.

A pipeline runs at the pace of its slowest stage, and units differ in cost (a VGG's first block can
take several times its last one's time), so an even split by count can waste most of the speed-up.
These functions time each part's training step on copies and choose the consecutive split that
minimises the slowest stage's time.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Callable, Iterable, Iterator, Sequence

import torch

from scpl_kit.methods.units import LocalUnit
from scpl_kit.signal import Signal, moved
from scpl_kit.updater import OptimizerSettings, UpdateRecipe, train_step

log = logging.getLogger(__name__)
BALANCES = ("time", "count")


def even_stages(n_units: int, n_stages: int) -> list[list[int]]:
    """Consecutive units, as evenly as possible (the first stages take one more when it does not divide)."""
    size, extra = divmod(n_units, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + size + (s < extra))
    return [list(range(bounds[s], bounds[s + 1])) for s in range(n_stages)]


def balanced_stages(times: Sequence[float], n_stages: int) -> list[list[int]]:
    """Consecutive groups of units minimising the slowest stage's total time (exact, by dynamic
    programming over split points; K is small). `times` are measured per-unit step times."""
    n = len(times)
    prefix = [0.0]
    for t in times:
        prefix.append(prefix[-1] + t)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]  # best[s][i]: first i units in s stages
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    groups, i = [], n
    for s in range(n_stages, 0, -1):
        groups.append(list(range(cut[s][i], i)))
        i = cut[s][i]
    return groups[::-1]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it measures that work (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_chain(steps: Iterable[Callable[[Signal], Signal]], signal: Signal, device: torch.device, repeats: int = 2) -> list[float]:
    """Seconds per call of each step in turn, each fed what the step before returned: one warm-up
    call (it also makes the next step's input, and lazy state such as Adam's moments), then the mean
    of `repeats` timed calls. Under fork_rng, so the run's random streams (dropout, say) come out as
    they went in and the run trains exactly as it would without the measurement."""
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        for step in steps:
            out = step(signal)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                step(signal)
            synchronize(device)
            times.append((time.perf_counter() - start) / repeats)
            signal = out
    return times


def unit_step_times(units: Sequence[LocalUnit], example: Signal, device: torch.device, recipe: UpdateRecipe | None = None) -> list[float]:
    """Seconds of one training step (forward, local loss, backward, update) of each unit on `example`,
    each unit fed the one before's handoff. Each unit is timed on a copy of it, with an updater of its
    own (the run's settings; Adam without a recipe), one at a time on `device`: the units do not change."""

    def trials() -> Iterator[Callable[[Signal], Signal]]:
        for unit in units:
            trial = copy.deepcopy(unit).to(device).train()
            updater = (recipe or UpdateRecipe(OptimizerSettings(), 100, 1)).updater(trial)
            yield lambda signal, trial=trial, updater=updater: train_step(trial, updater, signal)[0]

    return time_chain(trials(), moved(example, device), device)


def stage_time(times: Sequence[float], stages: list[list[int]]) -> float:
    """The slowest stage's total time: the pipeline's time per batch, transfers aside."""
    return max(sum(times[i] for i in stage) for stage in stages)


def split_by_time(what: str, times: list[float], n_stages: int) -> list[list[int]]:
    """`balanced_stages` of measured times, logged with the speed-up it promises over the even split."""
    stages, even = balanced_stages(times, n_stages), even_stages(len(times), n_stages)
    log.info(
        "%s' step times %s ms -> stages %s, ideal speed-up %.2fx (sum / slowest stage; the even split %s: %.2fx); "
        "set engine.stages to override",
        what, [round(t * 1e3, 1) for t in times], stages, sum(times) / stage_time(times, stages), even, sum(times) / stage_time(times, even),
    )
    return stages


def check_stages(stages: list[list[int]], n: int, world: int, what: str) -> None:
    if len(stages) != world or [i for stage in stages for i in stage] != list(range(n)):
        raise ValueError(f"engine.stages {stages} must split {what} 0..{n - 1} into {world} consecutive groups")


def check_balance(balance: str) -> None:
    if balance not in BALANCES:
        raise ValueError(f"engine.balance={balance!r}; valid: {', '.join(BALANCES)}")
