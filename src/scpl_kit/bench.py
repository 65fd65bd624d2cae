"""The benchmark harness: configurations measured in interleaved rounds, then each one's median
and spread, and a flag where the spread says the machine's load changed; a configuration measured as
one training run in fresh processes (what the run records of itself is the measurement); one figure.

A shared machine's load comes and goes. Measuring configuration A fully, then B, would put a load
change between them into their ratio; in interleaved rounds (round r measures every configuration
once, in the same order) it lands on every row alike, and shows as a row's spread over its rounds.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, Hashable, Sequence, TypeVar


if TYPE_CHECKING:
    import pandas as pd

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


# -- one training run as a benchmark's measurement -------------------------------------------------------------

@dataclass
class Run:
    """What a finished run wrote: metrics.json (its identity, environment and summary: accuracies and the
    last epoch's time/..., memory/..., comm/..., plan/...) and history.csv (every epoch's record)."""

    metrics: dict[str, Any]
    history: list[dict[str, float]]


def _train(overrides: list[str]) -> None:
    from scpl_kit.config import compose_config
    from scpl_kit.train import run

    run(compose_config(overrides))


def run_training(overrides: Sequence[str], processes: int = 1, ranks_per_node: int | None = None) -> Run:
    """`python -m scpl_kit.train <overrides>` in `processes` fresh processes on this machine, started
    as torchrun would (engines/launch.py; `ranks_per_node`: how many make a simulated node), its outputs
    in a temporary folder; returns what the run wrote there. A failed process fails the call."""
    import pandas as pd

    from scpl_kit.engines.launch import start_local

    from torch.multiprocessing import ProcessExitedException

    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            try:
                start_local(_train, processes, ([*overrides, f"out_dir={tmp}/run", f"trainer.checkpoint_dir={tmp}/checkpoints"],), ranks_per_node)
            except ProcessExitedException as error:
                # A rank killed by a signal: the CPU profiler has crashed a profiled pipeline rank (SIGSEGV,
                # seen once in CI on 3 December 2026, not reproduced in 8 tries). Run it again once, and say so.
                if error.signal_name is None or attempt == 2:
                    raise
                print(f"  {error}: running the configuration again", flush=True)
                continue
            return Run(json.loads(Path(tmp, "run", "metrics.json").read_text()), pd.read_csv(Path(tmp, "run", "history.csv")).to_dict("records"))
    raise AssertionError("unreachable")


# -- one figure routine ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Panel:
    """One bar chart of a figure: `column` per row, whiskers from `low` to `high` columns when given."""

    column: str
    xlabel: str
    title: str
    low: str | None = None
    high: str | None = None
    log: bool = False
    reference: float | None = None  # a vertical line (e.g. 1.0 for a speed-up)
    missing: str = "n/a"  # written where a row has no finite value


def bar_figure(table: "pd.DataFrame", labels: Sequence[str], colors: Sequence[str], panels: Sequence[Panel], path: Path) -> None:
    """Horizontal bar charts, one above the other, rows in the table's order; 880 px wide, since `dvc plots
    show` shows an image at its own size and crops what does not fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = np.arange(len(table))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 0.32 * len(table) * len(panels)), sharey=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        values = table[panel.column].astype(float).to_numpy()
        shown = np.isfinite(values) & ((values > 0) if panel.log else True)
        errors = None
        if panel.low and panel.high:
            errors = np.nan_to_num([values - table[panel.low].to_numpy(float), table[panel.high].to_numpy(float) - values]).clip(0)
        ax.barh(rows[shown], values[shown], color=np.asarray(colors)[shown], xerr=None if errors is None else errors[:, shown], capsize=2, log=panel.log)
        for row in rows[~shown]:
            ax.text(ax.get_xlim()[0], row, f" {panel.missing}", va="center", fontsize=8)
        if panel.reference is not None:
            ax.axvline(panel.reference, color="gray", lw=0.8)
        ax.set(xlabel=panel.xlabel, title=panel.title)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    axes[-1, 0].set_yticks(rows, labels)
    axes[-1, 0].invert_yaxis()  # the table's order, top to bottom
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- targets ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    target: str
    met: bool | None  # None: a row it needs was not measured (or failed)
    detail: str


def targets_markdown(verdicts: Sequence[Verdict]) -> str:
    mark = {True: "met", False: "**missed**", None: "not evaluated"}
    return "## Targets\n\n" + "".join(f"- {v.target}: {mark[v.met]}: {v.detail}\n" for v in verdicts)


def spread_warnings(table: "pd.DataFrame", name: str = "row") -> list[str]:
    """A line for each flagged row of a table with `samples_per_s`, `spread`, `rate_min`, `rate_max`, `flag`."""
    return [f"WARNING: {getattr(r, name)}: samples/s spread {r.spread:.0%} over rounds ({r.rate_min:.0f}..{r.rate_max:.0f}) exceeds "
            f"{SPREAD_LIMIT:.0%}: the machine's load changed; its ratios are unreliable" for r in table.itertuples() if r.flag]
