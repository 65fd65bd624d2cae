"""Training throughput and memory: SCPL against BP's pipeline schedules and BP with activation
checkpointing, each row a training run composed through the config path (docs/benchmarks.md).

    python bench/throughput.py --out reports            # also the DVC stage `throughput`
    python bench/throughput.py --rows bp1 scpl_pipeline --set trainer.batch_size=16

Every row is `python -m scpl_kit.train` on the row's overrides (conf/profile/bench*.yaml: random
CIFAR-10- or AG-News-shaped batches, one thread per worker, `trainer.measure`), in fresh processes, one
per worker; the table holds what each run recorded of itself: its steady samples/s, peak memory, and what
its pipeline's timed split promised. Rows run in interleaved rounds (scpl_kit.bench).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from scpl_kit.bench import SPREAD_LIMIT, Panel, Verdict, bar_figure, flagged, interleaved, median, run_training, spread, spread_warnings, targets_markdown
from scpl_kit.config import ConfigError, compose_config
from scpl_kit.environment import one_line
from scpl_kit.preflight import OneLineParser, PreflightError, Rule, check_options, check_output_dir, fail
from scpl_kit.registry import UnknownNameError

if TYPE_CHECKING:
    import pandas as pd

TARGET_SPEEDUP = 1.15
TIMED_STEPS = 6  # as conf/profile/bench*.yaml's steps_per_epoch has them  # the SCPL pipeline against the best BP schedule on the same workers
VGG = ("profile=bench", "model=vgg")
TRANSFORMER = ("profile=bench_text",)
BP_VGG = ("method=bp", "method.modules=6")  # VGG8 cut at each of its 6 convs: the finest split for a BP pipeline to balance
SCPL_VGG = ("method=scpl", "method.modules=6", "method.pool=true")  # one module per conv; SupCon's MLP on the pooled map
SCPL_TEXT = ("method=scpl", "method.projector=i")  # the paper's text SCPL: SupCon on the block's summary itself
# BP's schedules from torch.distributed.pipelining, M = 4 micro-batches; ZBV (zero bubble in a V) is left
# out: it ran below the interleaved zero-bubble schedule on VGG8 (282 vs 331 samples/s; docs/benchmarks.md).
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")


@dataclass(frozen=True)
class Row:
    name: str
    model: str
    method: str
    engine: str
    workers: int
    overrides: tuple[str, ...]
    schedule: str = "-"
    checkpoint: bool = False


def rows(workers: int) -> list[Row]:
    def bp_pipeline(model: str, base: tuple[str, ...], schedule: str, checkpoint: bool = False) -> Row:
        return Row(f"{model}_{schedule}" + ("_ckpt" if checkpoint else ""), model, "bp", "gpipe", workers,
                   (*base, "engine=gpipe", f"engine.schedule={schedule}", "engine.microbatches=4", f"method.checkpoint={str(checkpoint).lower()}"),
                   schedule, checkpoint)

    vgg_bp, text_bp = (*VGG, *BP_VGG), (*TRANSFORMER, "method=bp")
    return [
        Row("vgg_bp1", "vgg", "bp", "sequential", 1, vgg_bp),
        Row("vgg_bp1_ckpt", "vgg", "bp", "sequential", 1, (*vgg_bp, "method.checkpoint=true"), checkpoint=True),
        Row("vgg_scpl1", "vgg", "scpl", "sequential", 1, (*VGG, *SCPL_VGG)),
        *(bp_pipeline("vgg", vgg_bp, schedule) for schedule in SCHEDULES),
        bp_pipeline("vgg", vgg_bp, "1f1b", checkpoint=True),
        # One process of `workers` threads: the profiler cannot tell which thread frees what, so no memory.
        Row("vgg_scpl_threads", "vgg", "scpl", "threads", workers,
            (*VGG, *SCPL_VGG, "engine=threads", f"engine.devices=[{','.join(['cpu'] * workers)}]", "trainer.measure_memory_steps=0")),
        Row("vgg_scpl_pipeline", "vgg", "scpl", "pipeline", workers, (*VGG, *SCPL_VGG, "engine=pipeline")),
        Row("transformer_bp1", "transformer", "bp", "sequential", 1, text_bp),
        Row("transformer_bp1_ckpt", "transformer", "bp", "sequential", 1, (*text_bp, "method.checkpoint=true"), checkpoint=True),
        *(bp_pipeline("transformer", text_bp, schedule) for schedule in SCHEDULES),
        Row("transformer_scpl_pipeline", "transformer", "scpl", "pipeline", workers, (*TRANSFORMER, *SCPL_TEXT, "engine=pipeline")),
    ]


def measure(row: Row, first_round: bool, extra: Sequence[str]) -> dict[str, float]:
    """One run of `row`: what it recorded. Memory is profiled in the first round only (it does not depend on the load)."""
    # After the first round: time only, over the warm-up and the timed steps (the last override wins).
    memory = [] if first_round else ["trainer.measure_memory_steps=0", f"trainer.steps_per_epoch={TIMED_STEPS + 1}"]
    processes = 1 if row.engine in ("sequential", "threads") else row.workers
    return run_training([*row.overrides, *memory, "tracking.group=throughput", f"tracking.run_name=throughput-{row.name}", *extra], processes).metrics


def table_of(outcomes: list) -> "pd.DataFrame":
    import pandas as pd

    records = []
    for outcome in outcomes:
        row, runs = outcome.config, outcome.results
        rates = [r["time/samples_per_s"] for r in runs]
        first = runs[0] if runs else {}
        records.append({
            "row": row.name, "model": row.model, "method": row.method, "engine": row.engine, "schedule": row.schedule, "workers": row.workers,
            "checkpoint": row.checkpoint, "samples_per_s": median(rates), "spread": spread(rates), "flag": flagged(rates),
            "rate_min": min(rates, default=float("nan")), "rate_max": max(rates, default=float("nan")),
            "ideal_speedup": first.get("plan/ideal_speedup", float("nan")), "bubble_idle": first.get("plan/idle_share", float("nan")),
            "peak_mem_mb": first.get("memory/peak_mb", float("nan")), "error": outcome.error or "",
            "environment": one_line(first["environment"]) if first else "",
        })
    table = pd.DataFrame(records)
    bp1 = table[table.row.str.endswith("_bp1")].set_index("model")
    table["speedup_vs_bp1"] = table.samples_per_s / table.model.map(bp1.samples_per_s)
    table["mem_vs_bp1"] = table.peak_mem_mb / table.model.map(bp1.peak_mem_mb)
    best_bp = table[(table.engine == "gpipe")].groupby("model").samples_per_s.max()
    table["vs_best_bp"] = (table.samples_per_s / table.model.map(best_bp)).where(table.engine == "pipeline")
    return table


def verdicts(table: "pd.DataFrame") -> list[Verdict]:
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


COLUMNS = ["row", "method", "engine", "schedule", "workers", "checkpoint", "samples_per_s", "spread", "flag", "speedup_vs_bp1", "vs_best_bp",
           "ideal_speedup", "bubble_idle", "peak_mem_mb", "mem_vs_bp1"]


def write(table: "pd.DataFrame", rounds: int, out: Path) -> str:
    shown = table[COLUMNS].round(3)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    shown.to_csv(out / "tables" / "throughput.csv", index=False)
    notes = [*spread_warnings(table), *(f"{r.row} FAILED: {r.error}" for r in table.itertuples() if r.error)]
    text = (f"# Training throughput and peak memory, {table.workers.max()} workers of one thread each\n\n"
            f"Measured on {next((e for e in table.environment if e), '?')} (per worker), by each run itself (trainer.measure); "
            f"medians of {rounds} interleaved rounds, `flag`: spread > {SPREAD_LIMIT:.0%}. Rows, columns and what bounds them: docs/benchmarks.md.\n\n"
            + shown.to_markdown(index=False) + "\n" + "".join(f"\n- {n}" for n in notes) + "\n\n" + targets_markdown(verdicts(table)))
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python bench/throughput.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds: every row once per round; the table gives medians")
    parser.add_argument("--workers", type=int, default=2, help="processes of the pipelines (stages)")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="which rows, in this order (default: all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides added to every row, e.g. trainer.batch_size=16")
    args = parser.parse_args(argv)
    try:
        check_options({"--rounds": args.rounds, "--workers": args.workers}, {"--rounds": Rule(int, low=1), "--workers": Rule(int, low=1, high=4)})
        known = {row.name: row for row in rows(args.workers)}
        unknown = [name for name in args.rows or () if name not in known]
        if unknown:
            raise PreflightError(f"--rows: unknown {', '.join(unknown)}; valid: {', '.join(known)}")
        chosen = [known[name] for name in args.rows] if args.rows else list(known.values())
        for row in chosen:  # a misspelt key fails here, in a second, not in a worker minutes in
            try:
                compose_config([*row.overrides, *args.set])
            except (ConfigError, UnknownNameError) as error:
                raise PreflightError(f"--set: row {row.name}: {error}") from None
        check_output_dir(args.out, "--out")
    except PreflightError as error:
        sys.exit(fail(error))  # status 2, as argparse's own errors leave
    outcomes = interleaved(chosen, args.rounds, lambda row, r: measure(row, r == 0, args.set),
                           lambda row, r, m, s: print(f"  round {r + 1}/{args.rounds}  {row.name:28s} {m['time/samples_per_s']:8.1f} samples/s"
                                                      f"  peak {m.get('memory/peak_mb', float('nan')):7.1f} MB  ({s:.0f} s)", flush=True))
    print(write(table_of(outcomes), args.rounds, args.out))
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
