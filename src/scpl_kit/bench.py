"""The benchmark harness: configurations measured in interleaved rounds, then each one's median
and spread, and a flag where the spread says the machine's load changed.

A shared machine's load comes and goes. Measuring configuration A fully, then B, would put a load
change between them into their ratio; in interleaved rounds (round r measures every configuration
once, in the same order) it lands on every row alike, and shows as a row's spread over its rounds.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Sequence, TypeVar

SPREAD_LIMIT = 0.10  # a row whose rounds differ by more than this (÷ their median) is flagged: its ratios are unreliable

Item = TypeVar("Item", bound=Hashable)
Result = TypeVar("Result")


def median(values: Sequence[float]) -> float:
    """The median of the values that are numbers; NaN for none."""
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def spread(values: Sequence[float]) -> float:
    """(max − min) / median of the values that are numbers; NaN for none or a median of 0."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else math.nan


def flagged(values: Sequence[float], limit: float = SPREAD_LIMIT) -> bool:
    """Whether the rounds' spread exceeds `limit` (NaN, too few numbers to tell: not flagged)."""
    return bool(spread(values) > limit)


def last_line(error: BaseException) -> str:
    """The error's own last line (a worker's traceback ends with the real cause)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


@dataclass
class Outcome(Generic[Item, Result]):
    """One configuration's results, one per round, or the error that stopped it (then no results)."""

    config: Item
    results: list[Result] = field(default_factory=list)
    error: str | None = None


def interleaved(items: Sequence[Item], rounds: int, measure: Callable[[Item, int], Result],
                report: Callable[[Item, int, Result, float], None] | None = None) -> list[Outcome[Item, Result]]:
    """`measure(item, round)` for every item in every round, round by round. A configuration that
    fails is reported and left out of the later rounds, so it costs the others nothing; `report`
    hears each result (with the seconds it took) as it comes."""
    outcomes = [Outcome(item) for item in items]
    for r in range(rounds):
        started = time.perf_counter()
        for outcome in outcomes:
            if outcome.error:
                continue
            begun = time.perf_counter()
            try:
                result = measure(outcome.config, r)
            except Exception as error:  # noqa: BLE001  (a failed configuration must not cost the others' numbers)
                outcome.error = f"{type(error).__name__}: {last_line(error)}"
                outcome.results.clear()
                print(f"  round {r + 1}/{rounds}  {getattr(outcome.config, 'name', outcome.config)} FAILED: {outcome.error}", flush=True)
                traceback.print_exception(error, file=sys.stderr)
                continue
            outcome.results.append(result)
            if report is not None:
                report(outcome.config, r, result, time.perf_counter() - begun)
        print(f"round {r + 1}/{rounds} took {time.perf_counter() - started:.0f} s", flush=True)
    return outcomes
