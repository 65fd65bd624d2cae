"""Scaling on 2 workers: throughput, communication, memory and time to accuracy, measured in one run.

    python bench/scaling.py --out reports            # also the DVC stage `scaling` (params.yaml: scaling)

Every configuration is a real training run of VGG8 on MNIST-5k (the offline profile: its learning
rate, schedule and evaluation; `--width`, `--batch` and `--epochs` set here), each in fresh processes
(one per worker, as torchrun would start them, forked from a server that has imported torch once),
each limited to one thread, so ratios measure parallelism, not BLAS threading. The configurations
(`--configs`, in this order):

    bp1            BP on 1 worker (sequential engine): the baseline of every ratio
    ddp            BP under DDP: each worker trains on half of every batch, gradients all-reduced each step
    ddp_slow       the same, one worker (the last rank) slowed `--slowdown`× (it sleeps after each step)
    hierarchical   BP under hierarchical averaging with K' = `--average-every`: every worker its own node
                   (`--ranks-per-node` 1: 2 simulated nodes), parameters averaged across nodes every K' steps
    async          BP under the async engine: every worker trains whole batches and pushes to / pulls from a
                   parameter server on rank 0 without waiting; the epoch's batches shared by measured speed
    async_slow     the same, one worker slowed `--slowdown`×
    scpl_pipeline  SCPL across the workers as a pipeline (stages chosen by time at start-up)
    gpipe          BP under GPipe, M = `--microbatches` micro-batches per batch (stages chosen by time)
    ddp_scpl       SCPL under DDP (every worker every module, half of every batch; SupCon sees the whole batch)

Every data-parallel configuration trains on the same global batch (`--batch`) and the same number of
steps per epoch as BP on 1 worker, so they learn at the same pace per epoch and time to accuracy
compares like with like. DDP's byte counts use the same simulated nodes as hierarchical averaging
(`engine.ranks_per_node`), so "across nodes" means the same wire for both.

Model size. The default is the offline profile's VGG8 (width 0.0625, batch 32: 16 samples a worker
under DDP, ~12 ms of compute per step against 0.54 MB of weights all-reduced). Its all-reduce is not
what holds DDP back (hierarchical averaging, which all-reduces almost nothing, ran only ~15% faster);
the fixed costs of a step are (Python, DDP's reducer, waiting for the slower worker), and DDP ran
~1.05× BP on 1 worker. DDP's speed-up measured here (one round, 2 epochs, a shared 2-core machine):
1.05-1.15× (width 0.0625, batch 32), 1.26× (0.0625, 64), 1.3-1.5× (0.125, 32), 1.64× (0.125, 64),
1.71× (0.25, 64); each doubling of the width costs 2-3× the compute per sample (width 0.125: ~30%
more stage time), and larger batches reach 97% epochs later (fewer steps an epoch). 97% is near this
model's ceiling in 4 epochs (final validation accuracy 96.0-98.0% over configurations and seeds;
SCPL with pooled projectors 96.0-96.6%), so a row's `reached` is part of its result.

Rounds. A shared machine's load comes and goes, so every configuration runs `--rounds` times,
interleaved: round r runs every configuration once, in the same order, with seed `--seed` + r (so
accuracies are medians over seeds, and within a round every configuration starts from the same
weights and batches). A row gives the median of its rounds and their spread ((max - min) / median);
a row whose throughput spread exceeds 10% is flagged (`flag`) and a warning printed: its ratios are
not to be trusted. The targets below also give the range of the per-round (paired) ratios.

Columns.
  samples_per_s       median over rounds of the run's steady-state training throughput: training samples
                      ÷ rank 0's wall time in `train_epoch` (the trainer's `train_time_s`), over epochs 2..E
                      (the first is warm-up; all of them if E = 1). Evaluation and start-up are left out;
                      a pipeline's fill and drain and an engine's end-of-epoch work are in.
  spread, flag        (max - min) / median of samples_per_s over the rounds; flag: spread > 10%.
  speedup_vs_bp1      samples_per_s ÷ bp1's (medians).
  intra_node_bytes_per_step, inter_node_bytes_per_step
                      bytes moved between workers per training step (one global batch), all workers
                      together, in the last epoch, within a simulated node and across nodes (node of a
                      rank: rank // ranks_per_node): the engine's own count (its transport, logged as
                      comm/...; what is counted: src/scpl_kit/engines/transport.py). Collectives: each
                      rank's payload to the all-reduces and averages, summed over ranks (with 2 ranks
                      what a ring all-reduce puts on the wire); point to point (pipeline, gpipe:
                      activations, gradients, labels and their descriptions); RPC (async: each push's
                      update and the weights it pulls back). Bookkeeping objects (losses, speeds) are not counted.
  peak_act_mem_mb     the largest worker's high-water mark of tensor memory allocated during 4 training
                      steps above what it held before (scpl_kit.memory.peak_memory_mb: activations,
                      gradient and optimizer temporaries, buffers sent or received), measured in each
                      worker after its training in the first round (a second profiled pass, not timed).
  final_val_acc       median over rounds of the validation accuracy after the last epoch.
  time_to_acc_s       median over rounds of the training wall time (cumulative train_time_s, epoch 1
                      included; evaluation and start-up left out) until the end of the first epoch whose
                      validation accuracy reaches `--target`; a round that never reaches it counts as
                      infinitely late, so the median is `inf` (not reached) when half the rounds or more miss.
  time_to_acc_spread  (max - min) / median over the rounds that reached it (it mixes load and seed:
                      a seed that needs one epoch more moves it by a whole epoch); nan below 2 such rounds.
  epochs_to_acc       median over the rounds that reached the target of that first epoch.
  reached             rounds that reached the target / rounds.

Targets (the md's last section): DDP ≥ 1.8× BP on 1 worker; hierarchical averaging sends ≥ 10× fewer
bytes across nodes than DDP and ends (final_val_acc) no more than 0.5 points below DDP; with one worker
slowed 2×, async ≥ 1.3× DDP under the same slowdown (samples_per_s).

Writes reports/tables/scaling.{csv,md} and reports/figures/scaling.png. Exits with status 1 (after
writing them) when a configuration failed; its row then holds no numbers and the md says why.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed.pipelining  # noqa: F401  (the gpipe engine's; imported once here, in the server workers fork from: 1.7 s less per gpipe worker)
import mlflow  # noqa: F401  (the same for the runs' MLflow tracking: imported once, in the server)
import torch.multiprocessing as mp

from scpl_kit.config import compose_config
from scpl_kit.engines import build_engine
from scpl_kit.engines.launch import free_port, set_rank_env
from scpl_kit.environment import describe, one_line
from scpl_kit.memory import peak_memory_mb
from scpl_kit.data.datasets import load_prepared
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.preflight import OneLineParser, PreflightError, Rule, check_batch_fits, check_options, check_output_dir, check_values, fail
from scpl_kit.train import build, load_data, options, train_with, update_recipe
from scpl_kit.trainer import configure_torch
from scpl_kit.bench import SPREAD_LIMIT, Outcome, interleaved, median, spread
from throughput import START_METHOD  # the same worker start

if TYPE_CHECKING:
    import pandas as pd

TOLERANCE = 1e-9  # an accuracy of 485/500 computed in floating point still reaches a target of 0.97
MEMORY_STEPS = 4  # batches in the profiled pass: a stage then holds what it holds in steady state
TARGET_SPEEDUP_DDP, TARGET_BYTES_RATIO, TARGET_ACC_POINTS, TARGET_ASYNC_VS_DDP = 1.8, 10.0, 0.5, 1.3
# SCPL's projectors average-pool the feature map first (as in bench/throughput.py): the paper's MLP on the
# flattened map is most of SCPL's weights at this size, 39 MB of gradients a step for DDP to all-reduce.
POOLED = "method.pool=true"
ALL_CONFIGS = ("bp1", "ddp", "ddp_slow", "hierarchical", "async", "async_slow", "scpl_pipeline", "gpipe", "ddp_scpl")


@dataclass(frozen=True)
class Setup:
    width: float = 0.0625
    batch: int = 32
    epochs: int = 4
    target: float = 0.97
    workers: int = 2
    ranks_per_node: int = 1
    average_every: int = 50
    slowdown: float = 2.0
    microbatches: int = 4
    seed: int = 0
    timeout_s: int = 180
    processed_dir: str = "data/processed"  # where MNIST-5k was prepared (the DVC stage `prepare`)


@dataclass(frozen=True)
class Config:
    name: str
    method: str
    engine: str
    workers: int
    overrides: tuple[str, ...] = ()
    detail: str = ""  # for the table: what sets this row apart

    def training_overrides(self, setup: Setup, seed: int, out: Path) -> list[str]:
        return [
            "profile=offline", "data=mnist5k", f"data.processed_dir={setup.processed_dir}", "model=vgg", f"method={self.method}",
            f"engine={self.engine}", *self.overrides,
            f"model.width={setup.width}", f"trainer.batch_size={setup.batch}", f"trainer.epochs={setup.epochs}", f"seed={seed}",
            "trainer.threads=1", "trainer.progress=false", "trainer.resume=false", "trainer.eval_test=false",
            # Recorded like the grid's runs, grouped apart in MLflow (tracking.group); logging happens between epochs, outside the timed steps.
            "tracking.group=scaling", f"tracking.run_name=scaling-{self.name}-s{seed}", "+tracking.tags.bench=scaling",
            f"out_dir={out / 'run'}", f"trainer.checkpoint_dir={out / 'checkpoints'}",
        ]


def configs(setup: Setup, names: Sequence[str] = ALL_CONFIGS) -> list[Config]:
    w, last = setup.workers, setup.workers - 1
    nodes = f"engine.ranks_per_node={setup.ranks_per_node}"
    slow = (f"engine.slow_rank={last}", f"engine.slowdown={setup.slowdown}")
    timeout = f"engine.timeout_s={setup.timeout_s}"
    known = {
        "bp1": Config("bp1", "bp", "sequential", 1),
        "ddp": Config("ddp", "bp", "ddp", w, (nodes, timeout)),
        "ddp_slow": Config("ddp_slow", "bp", "ddp", w, (nodes, *slow, timeout), f"rank {last} slowed {setup.slowdown:g}×"),
        "hierarchical": Config("hierarchical", "bp", "hierarchical", w, (nodes, f"engine.average_every={setup.average_every}", timeout),
                               f"K'={setup.average_every}, {w // setup.ranks_per_node} nodes"),
        "async": Config("async", "bp", "async", w, (timeout,)),
        "async_slow": Config("async_slow", "bp", "async", w, (*slow, timeout), f"rank {last} slowed {setup.slowdown:g}×"),
        "scpl_pipeline": Config("scpl_pipeline", "scpl", "pipeline", w, (POOLED, timeout), "pooled projector"),
        "gpipe": Config("gpipe", "bp", "gpipe", w, (f"engine.microbatches={setup.microbatches}", timeout), f"M={setup.microbatches}"),
        "ddp_scpl": Config("ddp_scpl", "scpl", "ddp", w, (POOLED, nodes, timeout), "pooled projector"),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; valid: {', '.join(known)}")
    return [known[n] for n in names]


# -- pure parts: what one round's history says, medians and spreads, the table, the targets -------------------

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


@dataclass(frozen=True)
class Verdict:
    target: str
    met: bool | None  # None: a row it needs was not measured (or failed)
    detail: str


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
    name = f"hierarchical averaging: ≥ {TARGET_BYTES_RATIO:g}× fewer bytes across nodes than DDP, final accuracy within {TARGET_ACC_POINTS:g} points"
    if "ddp" in rows and "hierarchical" in rows:
        d, h = rows["ddp"], rows["hierarchical"]
        fewer = d.inter_node_bytes_per_step / h.inter_node_bytes_per_step if h.inter_node_bytes_per_step else math.inf
        points = (h.final_val_acc - d.final_val_acc) * 100
        verdicts.append(Verdict(name, bool(fewer >= TARGET_BYTES_RATIO and points >= -TARGET_ACC_POINTS - TOLERANCE), (
            f"{fewer:.1f}× fewer bytes across nodes ({h.inter_node_bytes_per_step:,.0f} vs {d.inter_node_bytes_per_step:,.0f} per step; "
            f"goal ≥ {TARGET_BYTES_RATIO:g}×); final val acc {h.final_val_acc:.2%} vs DDP's {d.final_val_acc:.2%} ({points:+.1f} points; "
            f"goal ≥ -{TARGET_ACC_POINTS:g})")))
    else:
        verdicts.append(Verdict(name, None, "not measured (needs ddp and hierarchical)"))
    verdicts.append(speed(f"one worker slowed: async ≥ {TARGET_ASYNC_VS_DDP:g}× DDP", "async_slow", "ddp_slow", TARGET_ASYNC_VS_DDP))
    return verdicts


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


def targets_markdown(verdicts: Sequence[Verdict]) -> str:
    mark = {True: "met", False: "**missed**", None: "not evaluated"}
    return "## Targets\n\n" + "".join(f"- {v.target}: {mark[v.met]}: {v.detail}\n" for v in verdicts)


def warnings(table: pd.DataFrame) -> list[str]:
    return [f"WARNING: {r.config}: samples/s spread {r.spread:.0%} over rounds ({r.rate_min:.0f}..{r.rate_max:.0f}) exceeds "
            f"{SPREAD_LIMIT:.0%}: the machine's load changed; its ratios are unreliable" for r in table.itertuples() if r.flag]


# -- measurement: one configuration, one round, in fresh processes ---------------------------------------------

class Recorder:
    """A listener that keeps every epoch's record (main process)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.history.append(dict(metrics))


def worker(rank: int, world: int, port: int, cfg: Any, setup: Setup, with_memory: bool, results) -> None:
    """One worker of one run: what `python -m scpl_kit.train` does (scpl_kit.train.run), plus, on
    request, a profiled pass for peak memory after training. Bytes sent come from the engine's own
    count (its transport; the epoch records' `comm/...`)."""
    if world > 1:
        set_rank_env(rank, world, port)
        os.environ["LOCAL_WORLD_SIZE"] = str(setup.ranks_per_node)  # the simulated nodes, as torchrun would describe them
    check_values(cfg)
    configure_torch(cfg.trainer.threads, cfg.trainer.deterministic)
    data = load_data(cfg)
    check_batch_fits(cfg, data.meta["sizes"]["train"])
    model, units = build(cfg, data)
    engine = build_engine(cfg.engine.name, **options(cfg.engine))
    try:
        engine.setup(units, model.example_batch(cfg.trainer.batch_size, data.num_classes), update_recipe(cfg, data))
        recorder = Recorder()
        train_with(cfg, data, engine, [recorder])
        memory = math.nan
        if with_memory:
            batches = list(itertools.islice(data.loader("train", cfg.trainer.batch_size, drop_last=True), MEMORY_STEPS))
            memory = peak_memory_mb(lambda: engine.train_epoch(batches))
        results.put({"rank": rank, "history": recorder.history if engine.is_main else None, "memory": memory})
    finally:
        engine.close()


def measure(config: Config, setup: Setup, seed: int, with_memory: bool) -> RoundResult:
    with tempfile.TemporaryDirectory(prefix=f"scaling-{config.name}-") as tmp:
        cfg = compose_config(config.training_overrides(setup, seed, Path(tmp)))
        results = mp.get_context(START_METHOD).SimpleQueue()
        port = free_port()
        mp.start_processes(worker, args=(config.workers, port, cfg, setup, with_memory, results), nprocs=config.workers, join=True,
                           start_method=START_METHOD)
        reports = [results.get() for _ in range(config.workers)]
    (history,) = [r["history"] for r in reports if r["history"] is not None]
    tta, epoch = time_to_accuracy(history, setup.target)
    return RoundResult(
        samples_per_s=steady_samples_per_s(history), time_to_acc_s=tta, epochs_to_acc=epoch, final_val_acc=history[-1]["val_acc"],
        intra_node_bytes_per_step=history[-1].get("comm/intra_node_bytes_per_step", 0.0),  # the job's, the last epoch's
        inter_node_bytes_per_step=history[-1].get("comm/inter_node_bytes_per_step", 0.0),
        peak_act_mem_mb=max(r["memory"] for r in reports) if with_memory else math.nan, val_accs=tuple(r["val_acc"] for r in history),
    )


def run_all(setup: Setup, names: Sequence[str], rounds: int) -> list[Outcome]:
    def report(config: Config, r: int, result: RoundResult, seconds: float) -> None:
        tta = f"{result.time_to_acc_s:6.1f} s (epoch {result.epochs_to_acc})" if result.epochs_to_acc else "not reached"
        print(f"  round {r + 1}/{rounds}  {config.name:14s} {result.samples_per_s:7.0f} samples/s  val {accuracies(result.val_accs)}  "
              f"to {setup.target:.0%}: {tta}  inter-node {result.inter_node_bytes_per_step:,.0f} B/step"
              + (f"  peak {result.peak_act_mem_mb:.1f} MB" if r == 0 else "") + f"  ({seconds:.0f} s)", flush=True)

    # Memory does not depend on the load: measured in the first round only.
    return interleaved(configs(setup, names), rounds, lambda config, r: measure(config, setup, setup.seed + r, with_memory=r == 0), report)


# -- outputs ----------------------------------------------------------------------------------------------------

def plot(table: pd.DataFrame, path: Path, target: float) -> None:
    """Four horizontal bar charts, one above the other, 880 px wide (`dvc plots show` crops wider
    images): speed-up, time to accuracy, bytes across nodes, peak memory. Whiskers span the rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = table[table.error == ""].reset_index(drop=True)
    labels = [f"{r.config} ({r.method}, {r.engine}, W={r.workers})" for r in table.itertuples()]
    colors = ["tab:blue" if m == "bp" else "tab:orange" for m in table.method]
    rows = range(len(table))
    fig, (speed, wait, wire, memory) = plt.subplots(4, 1, figsize=(8, 10), sharey=True)
    base = table.samples_per_s / table.speedup_vs_bp1
    speed.barh(rows, table.speedup_vs_bp1, color=colors, capsize=2,
               xerr=[(table.samples_per_s - table.rate_min) / base, (table.rate_max - table.samples_per_s) / base])
    speed.axvline(1.0, color="gray", lw=0.8)
    speed.set(xlabel="speed-up over BP on 1 worker (samples/s, medians over rounds)", title="training throughput (1 thread per worker)")
    reached = table.time_to_acc_s.where(table.time_to_acc_s < math.inf)
    wait.barh(rows, reached.fillna(0), color=colors, capsize=2,
              xerr=[(reached - table.tta_min).fillna(0), (table.tta_max - reached).fillna(0)])
    for i, value in enumerate(reached):
        if math.isnan(value):
            wait.text(0, i, " not reached", va="center", fontsize=8)
    wait.set(xlabel=f"seconds of training until validation accuracy ≥ {target:.0%} (median)", title="time to accuracy")
    kib = table.inter_node_bytes_per_step.fillna(0) / 2**10
    wire.barh(rows, kib.where(kib > 0, 1e-3), color=colors, log=True)  # log: hierarchical's KiB beside DDP of SCPL's MiB
    wire.set_xlim(left=max(kib[kib > 0].min() / 3, 1e-3) if (kib > 0).any() else 1e-3)
    for i, value in enumerate(kib):
        if value <= 0:
            wire.text(wire.get_xlim()[0], i, " none", va="center", fontsize=8)
    wire.set(xlabel="KiB sent across (simulated) nodes per step, all workers (log scale)", title="communication")
    memory.barh(rows, table.peak_act_mem_mb, color=colors)
    memory.set(xlabel="peak activation memory of the largest worker (MB)", title="memory")
    memory.set_yticks(rows, labels)
    memory.invert_yaxis()  # the table's order, top to bottom
    for ax in (speed, wait, wire, memory):
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(table: pd.DataFrame, verdicts: Sequence[Verdict], setup: Setup, rounds: int, out: Path,
                  outcomes: Sequence[Outcome] = ()) -> str:
    shown = table[COLUMNS].round(3)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    shown.to_csv(out / "tables" / "scaling.csv", index=False)
    header = (
        f"# Scaling on {setup.workers} workers of one thread each: VGG8 width {setup.width} on MNIST-5k, batch {setup.batch} "
        f"(global), {setup.epochs} epochs (offline profile)\n\n"
        f"Measured on {one_line({**describe(), 'torch_threads': '1'})} (per worker). Medians of {rounds} interleaved rounds "
        f"(seeds {setup.seed}..{setup.seed + rounds - 1}); `spread` = (max - min) / median of samples/s over the rounds, `flag`: spread > "
        f"{SPREAD_LIMIT:.0%}. Bytes: per training step, all workers together, {setup.ranks_per_node} worker(s) per simulated node. "
        f"Time to accuracy: training seconds until validation accuracy first reaches {setup.target:.0%} (end of epoch). "
        "Columns: bench/scaling.py's docstring.\n\n"
    )
    failed = "".join(f"\n- {r.config} FAILED: {r.error}" for r in table.itertuples() if r.error)
    notes = "".join(f"\n- {w}" for w in warnings(table)) + failed
    text = (header + shown.to_markdown(index=False) + "\n" + (notes + "\n" if notes else "") + "\n" + targets_markdown(verdicts)
            + ("\n" + rounds_markdown(outcomes) if outcomes else ""))
    (out / "tables" / "scaling.md").write_text(text)
    plot(table, out / "figures" / "scaling.png", setup.target)
    return shown.to_markdown(index=False)


# What each option may be (argparse has typed them): a value out of range would fail minutes in, in a worker, or never be met (a target above 1).
OPTION_RULES = {
    "--width": Rule(float, positive=True), "--batch": Rule(int, low=1), "--epochs": Rule(int, low=1), "--rounds": Rule(int, low=1),
    "--target": Rule(float, positive=True, high=1), "--workers": Rule(int, low=1), "--ranks-per-node": Rule(int, low=1),
    "--average-every": Rule(int, low=1), "--slowdown": Rule(float, low=1), "--microbatches": Rule(int, low=1), "--seed": Rule(int, low=0),
}


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be known before the first configuration starts: ranges, the batch's divisions,
    the prepared MNIST-5k and its size, a folder for the outputs."""
    check_options({option: getattr(args, option[2:].replace("-", "_")) for option in OPTION_RULES}, OPTION_RULES)
    if args.batch % args.workers or args.batch % args.microbatches:
        raise PreflightError(f"--batch {args.batch} must be a multiple of --workers {args.workers} and --microbatches {args.microbatches}")
    if args.workers % args.ranks_per_node:
        raise PreflightError(f"--ranks-per-node {args.ranks_per_node} must divide --workers {args.workers}")
    try:
        data = load_prepared("mnist5k", args.processed_dir, verify=False)  # every training run checks the checksums
    except (DatasetNotFoundError, CorruptDataError) as error:
        raise PreflightError(f"--processed-dir {args.processed_dir}: {error}") from None
    if args.batch > data.meta["sizes"]["train"]:
        raise PreflightError(f"--batch {args.batch} is larger than the training split of mnist5k ({data.meta['sizes']['train']} samples): no full batch to train on")
    check_output_dir(args.out, "--out")


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Setup()
    parser = OneLineParser(prog="python bench/scaling.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--width", type=float, default=defaults.width, help="VGG8 width multiplier")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="global batch (a multiple of --workers and of --microbatches)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds: every configuration once per round; rows give the median")
    parser.add_argument("--target", type=float, default=defaults.target, help="validation accuracy for time to accuracy")
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--ranks-per-node", "--ranks_per_node", type=int, default=defaults.ranks_per_node, help="workers per simulated node (1: every worker a node)")
    parser.add_argument("--average-every", "--average_every", type=int, default=defaults.average_every, help="hierarchical averaging's K'")
    parser.add_argument("--slowdown", type=float, default=defaults.slowdown, help="how many times slower the slowed worker runs")
    parser.add_argument("--microbatches", type=int, default=defaults.microbatches, help="GPipe's M")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="round r trains with seed + r")
    parser.add_argument("--processed-dir", "--processed_dir", default=defaults.processed_dir, help="where MNIST-5k was prepared")
    parser.add_argument("--configs", nargs="+", default=list(ALL_CONFIGS), choices=ALL_CONFIGS, metavar="CONFIG",
                        help=f"which rows, in this order (default: all: {' '.join(ALL_CONFIGS)})")
    args = parser.parse_args(argv)  # the DVC stage passes params.yaml's `scaling` block as --key value (underscored keys too)
    setup = Setup(args.width, args.batch, args.epochs, args.target, args.workers, args.ranks_per_node, args.average_every,
                  args.slowdown, args.microbatches, args.seed, processed_dir=args.processed_dir)
    try:
        check_arguments(args)
    except PreflightError as error:
        sys.exit(fail(error))  # status 2 through SystemExit, as argparse's own errors leave
    started = time.perf_counter()
    outcomes = run_all(setup, args.configs, args.rounds)
    table = build_table(outcomes)
    verdicts = evaluate_targets(table, {o.config.name: o for o in outcomes})
    print(write_outputs(table, verdicts, setup, args.rounds, args.out, outcomes))
    for line in warnings(table):
        print(line, flush=True)
    print(targets_markdown(verdicts), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
