"""The throughput table (bench/throughput.py; docs/benchmarks.md): from each row's runs, as they recorded
themselves, the medians, spreads and ratios, SCPL's pipeline against the best BP schedule, the targets,
the markdown and the figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scpl_kit.bench import SPREAD_LIMIT, Outcome, Panel, Verdict, bar_figure, flagged, median, spread, spread_warnings, targets_markdown
from scpl_kit.environment import one_line

TARGET_SPEEDUP = 1.15  # the SCPL pipeline against the best BP schedule on the same workers


def table_of(outcomes: list[Outcome], plans: dict[str, dict]) -> pd.DataFrame:
    """One row per configuration (`outcome.config`: name, model, method, engine, schedule, workers, checkpoint);
    `plans`: each one's profiled run (memory, and what its timed split promised)."""
    import pandas as pd

    records, environment = [], next((runs[0]["environment"] for runs in (o.results for o in outcomes) if runs), None)
    for outcome in outcomes:
        row, runs = outcome.config, outcome.results
        rates = [r["time/samples_per_s"] for r in runs]
        first = plans.get(row.name, {})  # the profiled run: memory, and what the timed split promised
        records.append({
            "row": row.name, "model": row.model, "method": row.method, "engine": row.engine, "schedule": row.schedule, "workers": row.workers,
            "checkpoint": row.checkpoint, "samples_per_s": median(rates), "spread": spread(rates), "flag": flagged(rates),
            "rate_min": min(rates, default=float("nan")), "rate_max": max(rates, default=float("nan")),
            "ideal_speedup": first.get("plan/ideal_speedup", float("nan")), "bubble_idle": first.get("plan/idle_share", float("nan")),
            "peak_mem_mb": first.get("memory/peak_mb", float("nan")), "error": outcome.error or "",
        })
    table = pd.DataFrame(records)
    table.attrs["environment"] = one_line(environment) if environment else "?"
    bp1 = table[table.row.str.endswith("_bp1")].set_index("model")
    table["speedup_vs_bp1"] = table.samples_per_s / table.model.map(bp1.samples_per_s)
    table["mem_vs_bp1"] = table.peak_mem_mb / table.model.map(bp1.peak_mem_mb)
    best_bp = table[(table.engine == "gpipe")].groupby("model").samples_per_s.max()
    table["vs_best_bp"] = (table.samples_per_s / table.model.map(best_bp)).where(table.engine == "pipeline")
    return table


def verdicts(table: pd.DataFrame) -> list[Verdict]:
    found = []
    for model in table.model.unique():
        rows_of = table[(table.model == model) & (table.error == "")].set_index("row")
        pipeline, ckpt, bps = f"{model}_scpl_pipeline", f"{model}_bp1_ckpt", rows_of[rows_of.engine == "gpipe"]
        if pipeline not in rows_of.index or bps.empty:
            found.append(Verdict(f"{model}: SCPL pipeline ≥ {TARGET_SPEEDUP}× the best BP schedule", None, "not measured"))
            continue
        best = bps.samples_per_s.idxmax()
        ratio = rows_of.samples_per_s[pipeline] / bps.samples_per_s[best]
        found.append(Verdict(f"{model}: SCPL pipeline ≥ {TARGET_SPEEDUP}× the best BP schedule on the same workers", bool(ratio >= TARGET_SPEEDUP),
                             f"{ratio:.2f}× ({rows_of.samples_per_s[pipeline]:.0f} vs {best}'s {bps.samples_per_s[best]:.0f} samples/s)"))
        if ckpt in rows_of.index:
            mine, theirs = rows_of.peak_mem_mb[pipeline], rows_of.peak_mem_mb[ckpt]
            found.append(Verdict(f"{model}: SCPL pipeline's largest stage ≤ BP with checkpointing on one worker (peak memory)", bool(mine <= theirs),
                                 f"{mine:.0f} vs {theirs:.0f} MB ({mine / theirs:.2f}×)"))
    return found


def profiles_markdown(plans: dict[str, dict]) -> str:
    """What each row's profiled run recorded of where its time and memory go: a pipeline's split and the
    step times it was chosen by (each block's forward+backward for BP's schedules, each module's training
    step for SCPL), each process's peak, each unit's own peak."""
    lines = ["## Profiles\n\n", "From each row's profiled run: stages (blocks or modules per stage, in order) and their step times (ms), "
             "each process's peak memory, each unit's peak within its own steps (MB).\n\n"]
    for name, metrics in plans.items():
        placement = metrics.get("placement") or {}
        ranks = sorted((k, v) for k, v in metrics.items() if k.startswith("memory/rank"))
        units = sorted((k, v) for k, v in metrics.items() if k.startswith("memory/unit/"))
        parts = []
        if placement.get("stages"):
            times = placement.get("step_times_s") or []
            parts.append("stages " + " | ".join(
                "[" + ", ".join(f"{i}: {times[i] * 1e3:.0f}" if i < len(times) else str(i) for i in stage) + "]" for stage in placement["stages"]))
        if ranks:
            parts.append("process peaks " + ", ".join(f"{v:.0f}" for _, v in ranks))
        if units:
            parts.append("units " + ", ".join(f"{k.split('/')[2]} {v:.0f}" for k, v in units))
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts) + "\n")
    return "".join(lines)


COLUMNS = ["row", "method", "engine", "schedule", "workers", "checkpoint", "samples_per_s", "spread", "flag", "speedup_vs_bp1", "vs_best_bp",
           "ideal_speedup", "bubble_idle", "peak_mem_mb", "mem_vs_bp1"]


def write(table: pd.DataFrame, plans: dict[str, dict], rounds: int, out: Path) -> str:
    shown = table[COLUMNS].round(3)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    shown.to_csv(out / "tables" / "throughput.csv", index=False)
    notes = [*spread_warnings(table), *(f"{r.row} FAILED: {r.error}" for r in table.itertuples() if r.error)]
    text = (f"# Training throughput and peak memory, {table.workers.max()} workers of one thread each\n\n"
            f"Measured on {table.attrs['environment']} (per worker), by each run itself (trainer.measure); "
            f"medians of {rounds} interleaved rounds, `flag`: spread > {SPREAD_LIMIT:.0%}. Rows, columns and what bounds them: docs/benchmarks.md.\n\n"
            + shown.to_markdown(index=False) + "\n" + "".join(f"\n- {n}" for n in notes) + "\n\n" + targets_markdown(verdicts(table)) + "\n" + profiles_markdown(plans))
    (out / "tables" / "throughput.md").write_text(text)
    measured = table[table.error == ""]
    colors = [{("vgg", "bp"): "tab:blue", ("vgg", "scpl"): "tab:orange", ("transformer", "bp"): "tab:cyan"}.get((r.model, r.method), "tab:red")
              for r in measured.itertuples()]
    bar_figure(measured, list(measured.row), colors, [
        Panel("speedup_vs_bp1", "speed-up over BP on 1 worker of the same model (medians; whiskers: the rounds)", "training throughput",
              reference=1.0),
        Panel("peak_mem_mb", "peak memory of the largest worker (MB; profiler, first round)", "memory", missing="not measured (one shared process)"),
    ], out / "figures" / "throughput.png")
    return text
