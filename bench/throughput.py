"""Throughput and activation memory of every method × engine, measured in one run.

    python bench/throughput.py --out reports            # also the DVC stage `throughput`

Each configuration runs in fresh processes (one per worker, as torchrun would start them), each
limited to one thread so ratios measure parallelism, not BLAS threading. Inputs are synthetic:
CIFAR-shaped batches for VGG8, AG-News-shaped ones for the Transformer (60 tokens, the paper's
speed-table setting; 4 classes, a 30,000-word vocabulary); throughput depends on shapes, not values.
Writes reports/tables/throughput.{csv,md} and reports/figures/throughput.png.

Cuts. VGG8 is cut at layer granularity (6 layers, one per conv) and each pipeline gets its own best
split for `--workers` stages: BP (under gpipe) is cut into its 6 layers and split by BP's own
forward+backward time per layer, measured on one worker at the micro-batch size of each row (M = 1:
the whole batch; M = 4: a quarter), so each GPipe row has the split that suits its M; SCPL is cut
into K modules, K = 4 (the paper's blocks) or 6 (one module per conv), whichever split's slowest
stage is the fastest (the highest predicted pipeline throughput), and split by the per-module
training-step times (the `modules` column says which K). The Transformer keeps its 4 blocks; BP
and SCPL each split them by their own times. All step times come from one calibration process
(one thread) before the measurements: the median of 3 timings of each block or module. VGG8 rows use the pooled projector only (global
average pool, then the MLP): the paper's MLP on the flattened map ("flat") is left out to keep the
whole stage within a few minutes on a 2-core machine.

Rounds. A shared machine's load comes and goes, so every configuration is measured in `--rounds`
interleaved rounds: round r runs every configuration once, in the same order, each in fresh
processes. A row gives the median of its rounds and their spread ((max - min) / median); a row
whose spread exceeds 10% is flagged (`flag`) and a warning printed: its ratios are not to be trusted.

Columns: modules (the K blocks the model is cut into), samples_per_s (median over rounds of the
training samples per second of wall time in steady state: the batches after the warm-up ones, timed
between completions within one epoch, so a pipeline's once-an-epoch fill and drain are left out; the
slowest rank's rate), spread, flag, speedup_vs_bp1 (÷ BP on one worker of the same model, medians),
vs_gpipe_m4 (the SCPL pipeline's ÷ GPipe M=4's of the same model), ideal_speedup (the SCPL
pipeline: the sum of the per-module step times measured on one worker ÷ the slowest stage's, the
best a K-stage pipeline can do over SCPL on one worker; GPipe: the sum of BP's per-layer
forward+backward times on a whole batch ÷ (M + K - 1) times the slowest stage's on one micro-batch,
i.e. over BP on one worker, with the bubble and the micro-batches' own speed in it), peak_act_mem_mb
(measured once, in the first round: the largest worker's high-water mark of tensor memory allocated
during training above what it held before, from the profiler's memory accounting: activations,
gradient and optimizer temporaries, batches queued for or received from other stages; not the
process's RSS; not given for the threads engine, whose workers share one process), mem_vs_bp1
(÷ BP on one worker's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.multiprocessing as mp

from scpl_kit.allocator import retain_freed_memory
from scpl_kit.bench import SPREAD_LIMIT, flagged, interleaved, median, spread
from scpl_kit.environment import describe, one_line
from scpl_kit.engines.launch import free_port, set_rank_env
from scpl_kit.engines.measure import MEMORY_STEPS
from scpl_kit.preflight import OneLineParser, PreflightError, Rule, check_options, check_output_dir, fail
from scpl_kit.updater import OptimizerSettings, UpdateRecipe

if TYPE_CHECKING:
    import pandas as pd

# Workers are forked from a server process that has imported this module (and torch) once, instead
# of each importing them anew (spawn): ~2 s less per configuration and round, and still a fresh
# process with nothing trained or allocated in it. pandas and matplotlib are imported only by the
# parent, where the table and figure are made.
START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


# AG News as the paper's speed tables feed it: 60 tokens per document, 4 classes, 30,000 words.
TEXT_LENGTH, TEXT_CLASSES, VOCABULARY = 60, 4, 30_000
VGG_LAYERS, SCPL_KS = 6, (4, 6)  # VGG8's convs (its finest cut); the SCPL module counts to choose from
GPIPE_MICROBATCHES = {"vgg": (1, 4), "transformer": (4,)}  # M = 1: naive model parallelism
TIMING_REPEATS = 3  # calibration: the median of this many timings of each block or module


@dataclass(frozen=True)
class Case:
    method: str
    engine: str
    workers: int
    microbatches: int = 0
    projector: str = "-"  # VGG8: "pooled" (SupCon's MLP on the globally pooled map); Transformer: "identity"
    stages: tuple[tuple[int, ...], ...] | None = None
    model: str = "vgg"
    modules: int | None = None  # recut the model into this many blocks (None: its own)
    schedule: str = "gpipe"  # BP's pipeline schedule (engine=gpipe)
    checkpoint: bool = False  # BP: activation checkpointing of every block


@dataclass(frozen=True)
class Setup:
    width: float
    batch: int
    steps: int
    warmup: int
    text_dim: int = 120


def as_stages(groups: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(g) for g in groups)


def build_model(model: str, setup: Setup):
    from scpl_kit.models import build_model as from_registry

    if model == "transformer":
        return from_registry("transformer", (TEXT_LENGTH,), TEXT_CLASSES, vocab_size=VOCABULARY, dim=setup.text_dim, ff_dim=setup.text_dim)
    return from_registry("vgg", (3, 32, 32), 10, width=setup.width)


def build_units(case: Case, setup: Setup):
    from scpl_kit.methods import build_units as from_method

    torch.manual_seed(0)
    model = build_model(case.model, setup)
    if case.method == "scpl":  # the paper's text SCPL: SupCon on the block's summary itself
        options = {"projector": "i"} if case.model == "transformer" else {"projector": "m", "pool": case.projector == "pooled"}
    else:
        options = {"checkpoint": True} if case.checkpoint else {}
    return from_method(case.method, model, TEXT_CLASSES if case.model == "transformer" else 10, modules=case.modules, **options)


def build_engine(case: Case):
    from scpl_kit.engines import build_engine as from_registry

    stages = [list(s) for s in case.stages] if case.stages else None
    if case.engine == "sequential":
        return from_registry("sequential", device="cpu")
    if case.engine == "threads":
        return from_registry("threads", devices=["cpu"] * case.workers)
    if case.engine == "gpipe":
        return from_registry("gpipe", microbatches=case.microbatches, schedule=case.schedule, stages=stages, backend="gloo", device="cpu", timeout_s=120)
    return from_registry("pipeline", stages=stages, backend="gloo", device="cpu", timeout_s=120)


def worker(rank: int, world: int, port: int, case: Case, setup: Setup, with_memory: bool, results) -> None:
    set_rank_env(rank, world, port)
    retain_freed_memory()  # as training does (scpl_kit.trainer.configure_torch)
    torch.set_num_threads(1)
    units = build_units(case, setup)
    engine = build_engine(case)
    engine.setup(units, recipe=UpdateRecipe(OptimizerSettings(), steps_per_epoch=10_000, epochs=1))  # Adam, as the paper trains
    # The engine measures itself (engines/measure.py): steady state is the batches after the
    # warm-up, timed between completions, the slowest rank's pace. A pipeline's fill and drain (K-1
    # stage steps, once an epoch) stay out: a real epoch (390 batches of CIFAR-10 at batch 128)
    # amortises them, a window of a few batches would not. GPipe's bubble is inside every step, so it
    # is in. Memory (first round): 4 steps after the warm-up profiled, so a stage holds what it would in steady
    # state (a batch queued for, or received from, a neighbour), and left out of the timing. The threads
    # engine holds both workers in one process, and the profiler's accounting of memory freed on other
    # threads is unreliable: no per-worker figure for it.
    memory_steps = MEMORY_STEPS if with_memory and case.engine != "threads" else 0
    engine.measure_steps(memory_steps, warmup=setup.warmup)
    engine.train_epoch(synthetic_batches(case.model, replace(setup, steps=setup.steps + memory_steps), torch.Generator().manual_seed(rank)))
    stats = engine.epoch_stats()
    if rank == 0:  # every rank has the job's: the slowest rank's pace, the largest peak
        results.put((stats["time/samples_per_s"], stats["memory/peak_mb"] if memory_steps else float("nan")))
    engine.close()


def synthetic_batches(model: str, setup: Setup, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """`setup.steps` batches shaped as the model's real data (values do not change the time)."""
    def batch() -> dict[str, torch.Tensor]:
        if model == "transformer":
            tokens = torch.randint(2, VOCABULARY, (setup.batch, TEXT_LENGTH), generator=generator)  # 0 pad, 1 unk
            lengths = torch.full((setup.batch,), TEXT_LENGTH)
            return {"features": tokens, "lengths": lengths, "labels": torch.randint(0, TEXT_CLASSES, (setup.batch,), generator=generator)}
        return {"features": torch.randn(setup.batch, 3, 32, 32, generator=generator), "labels": torch.randint(0, 10, (setup.batch,), generator=generator)}

    return [batch() for _ in range(setup.steps)]


# -- calibration: per-block and per-module step times on one worker, for the stage splits ----------------

def median_times(measure, repeats: int = TIMING_REPEATS) -> list[float]:
    """Each entry's median over `repeats` calls of `measure` (a list of seconds per block or module)."""
    return [statistics.median(ts) for ts in zip(*(measure() for _ in range(repeats)))]


def bp_block_times(model: str, setup: Setup, example, microbatches: int, modules: int | None) -> list[float]:
    """Seconds of each of BP's blocks' forward and backward on one micro-batch of `example` (the
    predictor with the last block), each fed the one before's output: what the gpipe engine's stages
    run (gpipe.block_step_times, the engine's own `balance: time` measurement)."""
    from scpl_kit.engines.gpipe import block_step_times

    (unit,) = build_units(Case("bp", "sequential", 1, model=model, modules=modules), setup)
    return median_times(lambda: block_step_times(unit.network(), example, torch.device("cpu"), microbatches))


def scpl_unit_times(case: Case, setup: Setup, example) -> list[float]:
    """Seconds of one training step (forward, loss, backward, optimizer step) of each SCPL module,
    each fed the one before's output (balance.unit_step_times, the pipeline engine's own measurement)."""
    from scpl_kit.engines.balance import unit_step_times

    units = build_units(case, setup)
    return median_times(lambda: unit_step_times(units, example, torch.device("cpu")))


def calibration_worker(rank: int, setup: Setup, results) -> None:
    retain_freed_memory()
    torch.set_num_threads(1)
    times: dict = {}
    for model in ("vgg", "transformer"):
        example = synthetic_batches(model, replace(setup, steps=1), torch.Generator().manual_seed(0))[0]
        modules = VGG_LAYERS if model == "vgg" else None
        for m in (1, *GPIPE_MICROBATCHES[model]):
            times[model, "bp", m] = bp_block_times(model, setup, example, m, modules)
        for k in SCPL_KS if model == "vgg" else (None,):
            projector = "pooled" if model == "vgg" else "identity"
            times[model, "scpl", k] = scpl_unit_times(Case("scpl", "sequential", 1, projector=projector, model=model, modules=k), setup, example)
    results.put(times)


def calibrate(setup: Setup) -> dict:
    results = mp.get_context(START_METHOD).SimpleQueue()
    mp.start_processes(calibration_worker, args=(setup, results), nprocs=1, join=True, start_method=START_METHOD)
    return results.get()


def plan(setup: Setup, k: int) -> tuple[list[Case], dict[Case, float]]:
    """The configurations to measure, each pipeline with its own balanced split, and their ideal speed-ups."""
    from scpl_kit.engines.balance import balanced_stages, stage_time

    started = time.perf_counter()
    times = calibrate(setup)
    ms = lambda ts: [round(t * 1e3, 1) for t in ts]  # noqa: E731
    print(f"calibration ({time.perf_counter() - started:.0f} s, one thread, median of {TIMING_REPEATS}):", flush=True)
    cases: list[Case] = []
    ideal: dict[Case, float] = {}
    for model in ("vgg", "transformer"):
        modules = VGG_LAYERS if model == "vgg" else None
        projector = "pooled" if model == "vgg" else "identity"
        # SCPL: the K whose slowest stage is the fastest, i.e. the pipeline that trains the most samples
        # per second. (Not the better ideal speed-up, sum ÷ slowest stage: that is over each K's own
        # one-worker time, so it favours a K whose modules are slower one after another.)
        options = {}
        for scpl_k in SCPL_KS if model == "vgg" else (None,):
            ts = times[model, "scpl", scpl_k]
            stages = as_stages(balanced_stages(ts, k))
            options[scpl_k] = (sum(ts) / stage_time(ts, stages), stages, stage_time(ts, stages))
            print(f"  {model} scpl K={scpl_k or len(ts)}: module step times {ms(ts)} ms (sum {sum(ts) * 1e3:.0f}) → stages {stages}, "
                  f"slowest stage {stage_time(ts, stages) * 1e3:.0f} ms, ideal speed-up {options[scpl_k][0]:.2f}", flush=True)
        scpl_k = min(options, key=lambda key: options[key][2]) if model == "vgg" else None
        scpl_ideal, scpl_stages, _ = options[scpl_k]
        whole = times[model, "bp", 1]  # BP's per-block times on a whole batch
        gpipe_rows = []
        for m in GPIPE_MICROBATCHES[model]:
            ts = times[model, "bp", m]
            stages = as_stages(balanced_stages(ts, k))
            gpipe_ideal = sum(whole) / ((m + k - 1) * stage_time(ts, stages))
            print(f"  {model} bp gpipe M={m}: block fwd+bwd times per micro-batch {ms(ts)} ms → stages {stages}, "
                  f"ideal speed-up {gpipe_ideal:.2f} (bubble bound {k * m / (m + k - 1):.2f})", flush=True)
            case = Case("bp", "gpipe", k, microbatches=m, stages=stages, model=model, modules=modules)
            gpipe_rows.append(case)
            ideal[case] = gpipe_ideal
        pipeline = Case("scpl", "pipeline", k, projector=projector, stages=scpl_stages, model=model, modules=scpl_k)
        ideal[pipeline] = scpl_ideal
        cases += [
            Case("bp", "sequential", 1, model=model, modules=modules),
            Case("scpl", "sequential", 1, projector=projector, model=model, modules=scpl_k),
            *gpipe_rows,
            *([Case("scpl", "threads", k, projector=projector, model=model, modules=scpl_k)] if model == "vgg" else []),
            pipeline,
        ]
    return cases, ideal


# -- measurement -----------------------------------------------------------------------------------------

def measure(case: Case, setup: Setup, with_memory: bool) -> tuple[float, float]:
    """(samples/s of the slowest rank, peak memory of the largest rank or NaN) of one run of `case`."""
    from scpl_kit.engines import ENGINES

    processes = case.workers if ENGINES.get(case.engine).multiprocess else 1
    results = mp.get_context(START_METHOD).SimpleQueue()
    mp.start_processes(worker, args=(processes, free_port(), case, setup, with_memory, results), nprocs=processes, join=True, start_method=START_METHOD)
    return results.get()


def label(case: Case) -> str:
    return (f"{case.model} {case.method} {case.engine} workers={case.workers}" + (f" M={case.microbatches}" if case.microbatches else "")
            + f" K={case.modules or '-'}")


def run_all(setup: Setup, k: int, rounds: int) -> pd.DataFrame:
    import pandas as pd

    cases, ideal = plan(setup, k)
    memory: dict[Case, float] = {}

    def measured(case: Case, r: int) -> float:
        rate, mem = measure(case, setup, with_memory=r == 0)  # memory does not depend on load: measured once
        memory.setdefault(case, mem)
        return rate

    def report(case: Case, r: int, rate: float, seconds: float) -> None:
        print(f"  round {r + 1}/{rounds}  {label(case):52s} {rate:8.1f} samples/s" + (f"  peak {memory[case]:7.1f} MB" if r == 0 else ""), flush=True)

    rows = []
    for outcome in interleaved(cases, rounds, measured, report):
        case, rates = outcome.config, outcome.results
        rows.append({
            **asdict(case),
            "modules": case.modules or 4,  # the Transformer's own 4 blocks
            "stages": str([list(s) for s in case.stages]) if case.stages else "-",
            "samples_per_s": median(rates), "spread": spread(rates), "flag": flagged(rates),
            "rate_min": min(rates, default=float("nan")), "rate_max": max(rates, default=float("nan")),
            "ideal_speedup": ideal.get(case, float("nan")), "peak_act_mem_mb": memory.get(case, float("nan")),
        })
    table = pd.DataFrame(rows)
    # Each model's rows against BP on one worker (and the pipeline against GPipe M=4) of the same model.
    bp1 = table.query("method == 'bp' and engine == 'sequential'").set_index("model")
    gpipe4 = table.query("engine == 'gpipe' and microbatches == 4").set_index("model").samples_per_s
    table["speedup_vs_bp1"] = table.samples_per_s / table.model.map(bp1.samples_per_s)
    table["vs_gpipe_m4"] = (table.samples_per_s / table.model.map(gpipe4)).where(table.engine == "pipeline")
    table["mem_vs_bp1"] = table.peak_act_mem_mb / table.model.map(bp1.peak_act_mem_mb)
    return table


COLUMNS = ["model", "method", "engine", "workers", "microbatches", "modules", "projector", "stages", "samples_per_s", "spread", "flag",
           "speedup_vs_bp1", "vs_gpipe_m4", "ideal_speedup", "peak_act_mem_mb", "mem_vs_bp1"]


def warnings(table: pd.DataFrame) -> list[str]:
    return [f"WARNING: {label(Case(r.method, r.engine, r.workers, r.microbatches, model=r.model, modules=r.modules))}: samples/s spread "
            f"{r.spread:.0%} over rounds ({r.rate_min:.0f}..{r.rate_max:.0f}) exceeds {SPREAD_LIMIT:.0%}: the machine's load changed; "
            "its ratios are unreliable" for r in table.itertuples() if r.flag]


def plot(table: pd.DataFrame, path: Path) -> None:
    """Two horizontal bar charts, one above the other: 880 px wide, so `dvc plots show`, which
    shows an image at its own size and crops what does not fit, shows all of it. The speed bars'
    whiskers span the rounds' slowest to fastest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.model} {r.method} {r.engine} W={r.workers}" + (f" M={r.microbatches}" if r.microbatches else "") + f" K={r.modules}"
              for r in table.itertuples()]
    fig, (speed, memory) = plt.subplots(2, 1, figsize=(8, 8), sharey=True)
    colors = [("tab:blue" if m == "bp" else "tab:orange") if model == "vgg" else ("tab:cyan" if m == "bp" else "tab:red") for m, model in zip(table.method, table.model)]
    rows = range(len(table))
    base = table.samples_per_s / table.speedup_vs_bp1  # BP-1's median, per row
    whiskers = [(table.samples_per_s - table.rate_min) / base, (table.rate_max - table.samples_per_s) / base]
    speed.barh(rows, table.speedup_vs_bp1, color=colors, xerr=whiskers, capsize=2)
    speed.axvline(1.0, color="gray", lw=0.8)
    speed.set(xlabel="speed-up over BP on 1 worker (of the same model; medians over rounds)", title="training throughput (1 thread per worker)")
    memory.barh(rows, table.peak_act_mem_mb, color=colors)
    memory.set(xlabel="peak activation memory of the largest worker (MB)", title="memory (threads engine: one shared process, not measured)")
    memory.set_yticks(rows, labels)
    memory.invert_yaxis()  # the table's order, top to bottom
    for ax in (speed, memory):
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


TEXT_HEADS = 6  # the Transformer's attention heads (conf/model/transformer.yaml): --text-dim must be a multiple
MAX_WORKERS = 4  # a pipeline stage per worker, and the Transformer (and SCPL at K = 4) has 4 blocks to share out


def check_arguments(args: argparse.Namespace) -> None:
    """Every number in range before the calibration starts (a bad one would otherwise fail minutes in, in a worker)."""
    check_options({"--width": args.width, "--batch": args.batch, "--steps": args.steps, "--warmup": args.warmup, "--workers": args.workers,
                   "--rounds": args.rounds, "--text-dim": args.text_dim}, {
        "--width": Rule(float, positive=True),
        "--batch": Rule(int, low=max(max(m) for m in GPIPE_MICROBATCHES.values())),  # GPipe splits it into M micro-batches
        "--steps": Rule(int, low=2), "--warmup": Rule(int, low=1), "--workers": Rule(int, low=1, high=MAX_WORKERS),
        "--rounds": Rule(int, low=1), "--text-dim": Rule(int, low=TEXT_HEADS),
    })
    if args.warmup >= args.steps:
        raise PreflightError(f"--warmup {args.warmup} must be below --steps {args.steps}: the batches after the warm-up are the ones timed")
    if args.text_dim % TEXT_HEADS:
        raise PreflightError(f"--text-dim {args.text_dim} must be a multiple of the Transformer's {TEXT_HEADS} attention heads")
    check_output_dir(args.out, "--out")


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python bench/throughput.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--width", type=float, default=0.25, help="VGG8 width multiplier")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="batches per measurement, warm-up included")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="K")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds: every configuration once per round; rows give the median")
    parser.add_argument("--text-dim", type=int, default=120, help="the Transformer's width (the paper's is 300), divisible by its 6 heads")
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
    except PreflightError as error:
        sys.exit(fail(error))  # status 2 through SystemExit, as argparse's own errors leave
    started = time.perf_counter()
    table = run_all(Setup(args.width, args.batch, args.steps, args.warmup, args.text_dim), args.workers, args.rounds)
    flagged = warnings(table)
    shown = table[COLUMNS].round(3)
    (args.out / "tables").mkdir(parents=True, exist_ok=True)
    shown.to_csv(args.out / "tables" / "throughput.csv", index=False)
    header = (f"# Training throughput, batch {args.batch}, {args.workers} workers of one thread each: VGG8 width {args.width} on "
              f"CIFAR-shaped inputs (pooled projector); Transformer width {args.text_dim} (4 blocks) on AG-News-shaped inputs ({TEXT_LENGTH} tokens)\n\n"
              f"Measured on {one_line({**describe(), 'torch_threads': '1'})} (per worker). Medians of {args.rounds} interleaved rounds "
              f"of {args.steps} batches ({args.warmup} warm-up); `spread` = (max - min) / median over the rounds, `flag`: spread > {SPREAD_LIMIT:.0%}.\n\n")
    notes = "".join(f"\n- {w}" for w in flagged)
    (args.out / "tables" / "throughput.md").write_text(header + shown.to_markdown(index=False) + "\n" + (notes + "\n" if notes else ""))
    plot(table, args.out / "figures" / "throughput.png")
    print(shown.to_markdown(index=False))
    for line in flagged:
        print(line, flush=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
