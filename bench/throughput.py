"""Throughput and activation memory of every method × engine, measured in one run.

    python bench/throughput.py --out reports            # also the DVC stage `throughput`

Each configuration runs in fresh processes (one per worker, as torchrun would start them), each
limited to one thread so ratios measure parallelism, not BLAS threading. Inputs are synthetic:
CIFAR-shaped batches for VGG8, AG-News-shaped ones for the Transformer (60 tokens, the paper's
speed-table setting; 4 classes, a 30,000-word vocabulary); throughput depends on shapes, not values.
Writes reports/tables/throughput.{csv,md} and reports/figures/throughput.png.

Columns: samples_per_s (training samples per second of wall time in steady state: the batches
after the warm-up ones, timed between completions within one epoch, so a pipeline's once-an-epoch
fill and drain are left out; the slowest rank's rate),
speedup_vs_bp1 (÷ BP on one worker, same run), ideal_speedup (for the pipeline: sum of the
per-stage step times measured on one worker ÷ the largest, i.e. the best a K-stage pipeline can do),
peak_act_mem_mb (the largest worker's high-water mark of tensor memory allocated during training
above what it held before, from the profiler's memory accounting: activations, gradient and
optimizer temporaries, batches queued for or received from other stages; not the process's RSS;
not given for the threads engine, whose workers share one process).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.multiprocessing as mp

from scpl_kit.allocator import retain_freed_memory
from scpl_kit.environment import describe, one_line
from scpl_kit.engines.launch import free_port, set_rank_env


# AG News as the paper's speed tables feed it: 60 tokens per document, 4 classes, 30,000 words.
TEXT_LENGTH, TEXT_CLASSES, VOCABULARY = 60, 4, 30_000


@dataclass(frozen=True)
class Case:
    method: str
    engine: str
    workers: int
    microbatches: int = 0
    projector: str = "-"  # VGG8: "flat" (the paper's MLP on the flattened map) or "pooled"; Transformer: "identity"
    stages: tuple[tuple[int, ...], ...] | None = None
    model: str = "vgg"


@dataclass(frozen=True)
class Setup:
    width: float
    batch: int
    steps: int
    warmup: int
    text_dim: int = 120


def cases(projector: str, k: int, stages: tuple[tuple[int, ...], ...], model: str = "vgg") -> list[Case]:
    if model == "transformer":  # the paper's text speed table: BP, SCPL, GPipe and the SCPL pipeline
        return [
            Case("bp", "sequential", 1, model=model),
            Case("scpl", "sequential", 1, projector=projector, model=model),
            Case("bp", "gpipe", k, microbatches=4, stages=stages, model=model),
            Case("scpl", "pipeline", k, projector=projector, stages=stages, model=model),
        ]
    return [
        Case("bp", "sequential", 1),
        Case("scpl", "sequential", 1, projector=projector),
        Case("bp", "gpipe", k, microbatches=1, stages=stages),  # naive model parallelism: BP on K workers
        Case("bp", "gpipe", k, microbatches=4, stages=stages),
        Case("scpl", "threads", k, projector=projector),
        Case("scpl", "pipeline", k, projector=projector, stages=stages),
    ]


def build_units(case: Case, setup: Setup):
    from scpl_kit.methods import build_units as from_method
    from scpl_kit.models import build_model
    from scpl_kit.trainer import adam_cosine

    torch.manual_seed(0)
    if case.model == "transformer":
        model = build_model("transformer", (TEXT_LENGTH,), TEXT_CLASSES, vocab_size=VOCABULARY, dim=setup.text_dim, ff_dim=setup.text_dim)
        options = {"projector": "i"} if case.method == "scpl" else {}  # the paper's text SCPL: SupCon on the block's summary itself
    else:
        model = build_model("vgg", (3, 32, 32), 10, width=setup.width)
        options = {"projector": "m", "pool": case.projector == "pooled"} if case.method == "scpl" else {}
    units = from_method(case.method, model, TEXT_CLASSES if case.model == "transformer" else 10, **options)
    for unit in units:
        unit.configure_optimizer(adam_cosine(1e-3, 1e-5, 10_000))
    return units


def build_engine(case: Case):
    from scpl_kit.engines import build_engine as from_registry

    stages = [list(s) for s in case.stages] if case.stages else None
    if case.engine == "sequential":
        return from_registry("sequential", device="cpu")
    if case.engine == "threads":
        return from_registry("threads", devices=["cpu"] * case.workers)
    if case.engine == "gpipe":
        return from_registry("gpipe", microbatches=case.microbatches, stages=stages, backend="gloo", device="cpu", timeout_s=120)
    return from_registry("pipeline", stages=stages, backend="gloo", device="cpu", timeout_s=120)


def peak_memory_mb(engine, batches) -> float:
    """High-water mark of tensor memory allocated while training on `batches`, above the start.

    The profiler attributes each allocation and free to the op that made it (`self` memory, so
    nested ops are not counted twice) or, outside any op, to a `[memory]` event; their running sum
    in time order is the memory held, and its maximum the peak. It sees the threads that run the
    training (engines allocate the buffers they receive into there), not oneDNN's internal scratch
    buffers. The resident-set high-water mark (VmHWM) was tried instead: repeating the same
    4-batch window in one BP process gave 270 to 346 MB, a spread as large as the differences
    this table is about.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine.train_epoch(batches)
    changes = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage) for e in prof.events()
    )
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak / 2**20


def worker(rank: int, world: int, port: int, case: Case, setup: Setup, results) -> None:
    set_rank_env(rank, world, port)
    retain_freed_memory()  # as training does (scpl_kit.trainer.configure_torch)
    torch.set_num_threads(1)
    units = build_units(case, setup)
    engine = build_engine(case)
    engine.setup(units)
    batches = synthetic_batches(case.model, setup, torch.Generator().manual_seed(rank))
    done: list[float] = []  # when each batch finished on this rank
    engine.train_epoch(batches, on_batch=lambda n: done.append(time.perf_counter()))
    # Steady state: batches after the warm-up, timed between completions on this rank. A pipeline's
    # fill and drain (K-1 stage steps, once an epoch) stay out: a real epoch (390 batches of CIFAR-10
    # at batch 128) amortises them, a window of a few batches would not. GPipe's bubble is inside
    # every step, so it is in. Ranks that see no labels (later GPipe stages) report no rate.
    rate = (len(done) - setup.warmup) * setup.batch / (done[-1] - done[setup.warmup - 1]) if done else float("nan")
    unit_times = time_units(units, batches[:3]) if case.engine == "sequential" and case.method == "scpl" else None
    # The threads engine holds both workers in one process, and the profiler's accounting of memory
    # freed on other threads is unreliable: no per-worker figure for it. Four batches, so a stage
    # holds what it would hold in steady state (a batch queued for, or received from, a neighbour).
    memory = float("nan") if case.engine == "threads" else peak_memory_mb(engine, batches[:4])
    results.put((rank, rate, memory, unit_times))
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


def time_units(units, batches) -> list[float]:
    """Seconds per training step of each unit alone (forward, loss, backward, step), one thread."""
    times = [0.0] * len(units)
    for batch in batches:
        signal = dict(batch)
        for i, unit in enumerate(units):
            start = time.perf_counter()
            signal, _ = unit.train_step(signal)
            times[i] += time.perf_counter() - start
    return [t / len(batches) for t in times]


def measure(case: Case, setup: Setup) -> dict:
    processes = 1 if case.engine in ("sequential", "threads") else case.workers
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(processes, free_port(), case, setup, results), nprocs=processes, join=True, start_method="spawn")
    reports = sorted(results.get() for _ in range(processes))
    return {
        **asdict(case),
        "stages": str([list(s) for s in case.stages]) if case.stages else "-",
        "samples_per_s": min(r[1] for r in reports if r[1] == r[1]),  # the slowest rank sets the pace (NaN: no rate)
        "peak_act_mem_mb": max(r[2] for r in reports),
        "rank_mem_mb": [round(r[2], 1) for r in reports],
        "unit_times": reports[0][3],
    }


def run_all(setup: Setup, k: int) -> pd.DataFrame:
    from scpl_kit.engines.pipeline import balanced_stages

    rows = []
    for model, projector in (("vgg", "flat"), ("vgg", "pooled"), ("transformer", "identity")):
        # Stage split balanced from per-block times measured on one worker, as the engine docs advise.
        scpl1 = measure(Case("scpl", "sequential", 1, projector=projector, model=model), setup)
        times = scpl1["unit_times"]
        stages = tuple(tuple(s) for s in balanced_stages(times, k))
        ideal = sum(times) / max(sum(times[i] for i in s) for s in stages)
        print(f"[{model} {projector}] unit step times {[round(t * 1000, 1) for t in times]} ms → stages {stages}, ideal speed-up {ideal:.2f}", flush=True)
        for case in cases(projector, k, stages, model):
            if projector == "pooled" and case.method == "bp":
                continue  # BP has no projector: measured once
            row = scpl1 if case == Case("scpl", "sequential", 1, projector=projector, model=model) else measure(case, setup)
            row["ideal_speedup"] = ideal if case.engine == "pipeline" else float("nan")
            rows.append(row)
            print(f"  {model:11s} {case.method:5s} {case.engine:10s} workers={case.workers} M={case.microbatches} {case.projector:8s} "
                  f"{row['samples_per_s']:8.1f} samples/s  peak {row['peak_act_mem_mb']:7.1f} MB (per rank {row['rank_mem_mb']})", flush=True)
    table = pd.DataFrame(rows).drop(columns=["unit_times", "rank_mem_mb"])
    # Each model's rows against BP on one worker of the same model.
    bp1 = table.query("method == 'bp' and engine == 'sequential'").set_index("model").samples_per_s
    table["speedup_vs_bp1"] = table.samples_per_s / table.model.map(bp1)
    return table[["model", "method", "engine", "workers", "microbatches", "projector", "stages", "samples_per_s", "speedup_vs_bp1", "ideal_speedup", "peak_act_mem_mb"]]


def plot(table: pd.DataFrame, path: Path) -> None:
    """Two horizontal bar charts, one above the other: 880 px wide, so `dvc plots show`, which
    shows an image at its own size and crops what does not fit, shows all of it."""
    labels = [f"{r.model} {r.method} {r.engine} K={r.workers}" + (f" M={r.microbatches}" if r.microbatches else "") + (f" {r.projector}" if r.projector != "-" else "") for r in table.itertuples()]
    fig, (speed, memory) = plt.subplots(2, 1, figsize=(8, 8), sharey=True)
    colors = [("tab:blue" if m == "bp" else "tab:orange") if model == "vgg" else ("tab:cyan" if m == "bp" else "tab:red") for m, model in zip(table.method, table.model)]
    rows = range(len(table))
    speed.barh(rows, table.speedup_vs_bp1, color=colors)
    speed.axvline(1.0, color="gray", lw=0.8)
    speed.set(xlabel="speed-up over BP on 1 worker (of the same model)", title="training throughput (1 thread per worker)")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--width", type=float, default=0.25, help="VGG8 width multiplier")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24, help="batches per measurement, warm-up included")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="K")
    parser.add_argument("--text-dim", type=int, default=120, help="the Transformer's width (the paper's is 300), divisible by its 6 heads")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error(f"need 1 <= --warmup < --steps (got warmup {args.warmup}, steps {args.steps})")
    table = run_all(Setup(args.width, args.batch, args.steps, args.warmup, args.text_dim), args.workers)
    (args.out / "tables").mkdir(parents=True, exist_ok=True)
    table.round(3).to_csv(args.out / "tables" / "throughput.csv", index=False)
    header = (f"# Training throughput, batch {args.batch}, {args.workers} workers of one thread each: VGG8 width {args.width} on "
              f"CIFAR-shaped inputs; Transformer width {args.text_dim} (4 blocks) on AG-News-shaped inputs ({TEXT_LENGTH} tokens)\n\nMeasured on {one_line({**describe(), 'torch_threads': '1'})} (per worker).\n\n")
    (args.out / "tables" / "throughput.md").write_text(header + table.round(3).to_markdown(index=False) + "\n")
    plot(table, args.out / "figures" / "throughput.png")
    print(table.round(3).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
