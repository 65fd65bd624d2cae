"""The scaling table (bench/scaling.py; docs/benchmarks.md): from each configuration's rounds, as its runs
recorded them, the medians, spreads, time to accuracy, the targets, the markdown and the figure."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from scpl_kit.bench import SPREAD_LIMIT, Outcome, Panel, Verdict, bar_figure, median, spread, spread_warnings, targets_markdown
from scpl_kit.environment import describe, one_line

TOLERANCE = 1e-9  # an accuracy of 485/500 computed in floating point still reaches a target of 0.97
TARGET_SPEEDUP_DDP, TARGET_BYTES_RATIO, TARGET_ACC_POINTS, TARGET_ASYNC_VS_DDP = 1.8, 10.0, 0.5, 1.3


def steady_samples_per_s(history: Sequence[dict[str, float]]) -> float:
    """Training samples ÷ training time over epochs 2..E (every epoch when there is one)."""
    epochs = list(history[1:] if len(history) > 1 else history)
    samples = sum(r["samples_per_s"] * r["train_time_s"] for r in epochs)
    return samples / sum(r["train_time_s"] for r in epochs)


def time_to_accuracy(history: Sequence[dict[str, float]], target: float) -> tuple[float, int | None]:
    """(Cumulative training seconds, epoch) at the end of the first epoch whose val_acc reaches
    `target`; (inf, None) when none does."""
    elapsed = 0.0
    for record in history:
        elapsed += record["train_time_s"]
        if record["val_acc"] >= target - TOLERANCE:
            return elapsed, int(record["epoch"])
    return math.inf, None


@dataclass
class RoundResult:
    """One configuration's numbers from one round."""

    samples_per_s: float
    time_to_acc_s: float  # inf: never reached
    epochs_to_acc: int | None
    final_val_acc: float
    intra_node_bytes_per_step: float = math.nan
    inter_node_bytes_per_step: float = math.nan
    peak_act_mem_mb: float = math.nan  # measured in the first round only
    val_accs: tuple[float, ...] = ()  # every epoch's validation accuracy (the md's per-round section)


def row(outcome: Outcome) -> dict[str, Any]:
    c, rs = outcome.config, outcome.results
    rates = [r.samples_per_s for r in rs]
    times = [r.time_to_acc_s for r in rs]
    reached = [t for t in times if math.isfinite(t)]
    first = lambda name: next((getattr(r, name) for r in rs if not math.isnan(getattr(r, name))), math.nan)  # noqa: E731
    rate_spread = spread(rates)
    return {
        "config": c.name, "method": c.method, "engine": c.engine, "workers": c.workers, "detail": c.detail or "-",
        "samples_per_s": median(rates), "spread": rate_spread, "flag": bool(rate_spread > SPREAD_LIMIT),
        "rate_min": min(rates, default=math.nan), "rate_max": max(rates, default=math.nan),
        # Bytes per step depend on the shapes and the schedule, not on the load: the rounds agree (medians anyway).
        "intra_node_bytes_per_step": median([r.intra_node_bytes_per_step for r in rs]),
        "inter_node_bytes_per_step": median([r.inter_node_bytes_per_step for r in rs]),
        "peak_act_mem_mb": first("peak_act_mem_mb"),
        "final_val_acc": median([r.final_val_acc for r in rs]),
        "time_to_acc_s": median(times), "time_to_acc_spread": spread(reached) if len(reached) > 1 else math.nan,
        "tta_min": min(reached, default=math.nan), "tta_max": max(reached, default=math.nan),
        "epochs_to_acc": median([r.epochs_to_acc for r in rs if r.epochs_to_acc is not None]),
        "reached": f"{len(reached)}/{len(rs)}", "error": outcome.error or "",
    }


def build_table(outcomes: Sequence[Outcome]) -> pd.DataFrame:
    import pandas as pd

    table = pd.DataFrame([row(o) for o in outcomes])
    bp1 = table.samples_per_s[table.config == "bp1"]
    table["speedup_vs_bp1"] = table.samples_per_s / (bp1.iloc[0] if len(bp1) else math.nan)
    return table


COLUMNS = ["config", "method", "engine", "workers", "detail", "samples_per_s", "spread", "flag", "speedup_vs_bp1",
           "intra_node_bytes_per_step", "inter_node_bytes_per_step", "peak_act_mem_mb", "final_val_acc",
           "time_to_acc_s", "time_to_acc_spread", "epochs_to_acc", "reached"]


def paired_ratios(outcomes: dict[str, Outcome], top: str, bottom: str) -> list[float]:
    """Per-round samples/s of `top` ÷ `bottom`: the same round, so the same load (about)."""
    return [a.samples_per_s / b.samples_per_s for a, b in zip(outcomes[top].results, outcomes[bottom].results)]


def evaluate_targets(table: pd.DataFrame, outcomes: dict[str, Outcome]) -> list[Verdict]:
    rows = {r.config: r for r in table.itertuples() if not r.error}
    flagged = lambda *names: [n for n in names if rows[n].flag]  # noqa: E731

    def unreliable(*names: str) -> str:
        noisy = flagged(*names)
        return f"; unreliable: throughput spread > {SPREAD_LIMIT:.0%} in {', '.join(noisy)}" if noisy else ""

    def speed(name: str, top: str, bottom: str, goal: float) -> Verdict:
        if top not in rows or bottom not in rows:
            return Verdict(name, None, f"not measured (needs {top} and {bottom})")
        ratio = rows[top].samples_per_s / rows[bottom].samples_per_s
        pairs = paired_ratios(outcomes, top, bottom)
        return Verdict(name, bool(ratio >= goal), (
            f"{ratio:.2f}× ({rows[top].samples_per_s:.0f} vs {rows[bottom].samples_per_s:.0f} samples/s, medians; "
            f"per-round ratios {min(pairs):.2f}..{max(pairs):.2f}); goal ≥ {goal:g}×" + unreliable(top, bottom)))

    verdicts = [speed(f"DDP ≥ {TARGET_SPEEDUP_DDP:g}× BP on 1 worker", "ddp", "bp1", TARGET_SPEEDUP_DDP)]
    for config, schedule in (("hierarchical", "K′ steps"), ("hierarchical_epoch", "once per epoch")):
        verdicts.append(node_based(rows, config, schedule))
    verdicts.append(straggler(rows, outcomes))
    return verdicts


def node_based(rows: dict[str, Any], config: str, schedule: str) -> Verdict:
    """Node-based averaging against DDP on the same nodes: bytes across nodes, and final accuracy."""
    name = (f"hierarchical averaging ({schedule}): ≥ {TARGET_BYTES_RATIO:g}× fewer bytes across nodes than DDP on the same nodes, "
            f"final accuracy within {TARGET_ACC_POINTS:g} points")
    if "ddp_nodes" not in rows or config not in rows:
        return Verdict(name, None, f"not measured (needs ddp_nodes and {config})")
    d, h = rows["ddp_nodes"], rows[config]
    fewer = d.inter_node_bytes_per_step / h.inter_node_bytes_per_step if h.inter_node_bytes_per_step else math.inf
    points = (h.final_val_acc - d.final_val_acc) * 100
    return Verdict(name, bool(fewer >= TARGET_BYTES_RATIO and points >= -TARGET_ACC_POINTS - TOLERANCE), (
        f"{fewer:.1f}× fewer bytes across nodes ({h.inter_node_bytes_per_step:,.0f} vs {d.inter_node_bytes_per_step:,.0f} per step; "
        f"goal ≥ {TARGET_BYTES_RATIO:g}×); final val acc {h.final_val_acc:.2%} vs DDP's {d.final_val_acc:.2%} ({points:+.1f} points, "
        f"medians; goal ≥ -{TARGET_ACC_POINTS:g})"))


def straggler(rows: dict[str, Any], outcomes: dict[str, Outcome]) -> Verdict:
    """With one worker slowed, asynchronous SGD against DDP by time to the target accuracy (not samples/s:
    stale updates can make a faster pace reach the target later, or not at all)."""
    name = f"one worker slowed: async_sgd reaches the target in every round, ≥ {TARGET_ASYNC_VS_DDP:g}× sooner than DDP (median seconds)"
    if "async_sgd_slow" not in rows or "ddp_slow" not in rows:
        return Verdict(name, None, "not measured (needs async_sgd_slow and ddp_slow)")
    a, d = rows["async_sgd_slow"], rows["ddp_slow"]
    sooner = d.time_to_acc_s / a.time_to_acc_s if math.isfinite(a.time_to_acc_s) else 0.0
    every_round = all(math.isfinite(r.time_to_acc_s) for r in outcomes["async_sgd_slow"].results)
    seconds = lambda t: f"{t:.1f} s" if math.isfinite(t) else "not reached"  # noqa: E731
    return Verdict(name, bool(every_round and sooner >= TARGET_ASYNC_VS_DDP), (
        f"{sooner:.2f}× sooner ({seconds(a.time_to_acc_s)} vs {seconds(d.time_to_acc_s)}); reached in {a.reached} rounds against DDP's {d.reached}; "
        f"final val acc {a.final_val_acc:.2%} vs {d.final_val_acc:.2%} (medians)"))


def accuracies(values: Sequence[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def rounds_markdown(outcomes: Sequence[Outcome]) -> str:
    """Every round's own numbers, so a median can be checked against what it summarises."""
    lines = ["## Per round\n\n", "samples/s; seconds to the target (- : not reached); validation accuracy after each epoch.\n\n"]
    for o in outcomes:
        rounds = "; ".join(
            f"r{k + 1}: {r.samples_per_s:.0f}/s, " + (f"{r.time_to_acc_s:.1f} s" if math.isfinite(r.time_to_acc_s) else "-")
            + f", val {accuracies(r.val_accs)}" for k, r in enumerate(o.results))
        lines.append(f"- {o.config.name}: {rounds or o.error}\n")
    return "".join(lines)


def plot(table: pd.DataFrame, path: Path, target: float) -> None:
    """Speed-up, time to accuracy, bytes across nodes and peak memory; whiskers span the rounds."""
    table = table[table.error == ""].reset_index(drop=True)
    reached = table.time_to_acc_s.where(table.time_to_acc_s < math.inf)
    base = table.samples_per_s / table.speedup_vs_bp1
    bar_figure(table.assign(speed_low=table.rate_min / base, speed_high=table.rate_max / base, reached=reached,
                            kib=table.inter_node_bytes_per_step / 2**10),
               [f"{r.config} ({r.method}, {r.engine}, W={r.workers})" for r in table.itertuples()],
               ["tab:blue" if m == "bp" else "tab:orange" for m in table.method], [
        Panel("speedup_vs_bp1", "speed-up over BP on 1 worker (samples/s, medians over rounds)", "training throughput (1 thread per worker)",
              "speed_low", "speed_high", reference=1.0),
        Panel("reached", f"seconds of training until validation accuracy ≥ {target:.0%} (median)", "time to accuracy", "tta_min", "tta_max",
              missing="not reached"),
        Panel("kib", "KiB sent across (simulated) nodes per step, all workers (log scale)", "communication", log=True, missing="none"),
        Panel("peak_act_mem_mb", "peak activation memory of the largest worker (MB)", "memory"),
    ], path)


def write_outputs(table: pd.DataFrame, verdicts: Sequence[Verdict], setup: Any, rounds: int, out: Path,
                  outcomes: Sequence[Outcome] = ()) -> str:
    shown = table[COLUMNS].round(3)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    shown.to_csv(out / "tables" / "scaling.csv", index=False)
    header = (
        f"# Scaling on {setup.workers} workers of one thread each: VGG8 width {setup.width} on MNIST-5k, batch {setup.batch} "
        f"(global), {setup.epochs} epochs (offline profile)\n\n"
        f"Measured on {one_line({**describe(), 'torch_threads': '1'})} (per worker). Medians of {rounds} interleaved rounds "
        f"(seeds {setup.seed}..{setup.seed + rounds - 1}); `spread` = (max - min) / median of samples/s over the rounds, `flag`: spread > "
        f"{SPREAD_LIMIT:.0%}. Bytes: per training step, all workers together, {setup.ranks_per_node} worker(s) per simulated node, "
        f"except the node-based rows (ddp_nodes, hierarchical*): 2 simulated nodes of {setup.node_ranks} ranks, "
        f"{2 * setup.node_ranks} processes, more than this machine's cores when it has fewer: compare their bytes and accuracy, not their "
        "samples/s or seconds. "
        f"Time to accuracy: training seconds until validation accuracy first reaches {setup.target:.0%} (end of epoch). "
        "Columns: docs/benchmarks.md.\n\n"
    )
    failed = "".join(f"\n- {r.config} FAILED: {r.error}" for r in table.itertuples() if r.error)
    notes = "".join(f"\n- {w}" for w in spread_warnings(table, "config")) + failed
    text = (header + shown.to_markdown(index=False) + "\n" + (notes + "\n" if notes else "") + "\n" + targets_markdown(verdicts)
            + ("\n" + rounds_markdown(outcomes) if outcomes else ""))
    (out / "tables" / "scaling.md").write_text(text)
    plot(table, out / "figures" / "scaling.png", setup.target)
    return shown.to_markdown(index=False)
