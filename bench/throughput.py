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
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from scpl_kit.bench import interleaved, run_training
from scpl_kit.config import ConfigError, compose_config
from scpl_kit.preflight import OneLineParser, PreflightError, Rule, check_options, check_output_dir, fail
from scpl_kit.registry import UnknownNameError
from scpl_kit.report.throughput import table_of, write

MEMORY_STEPS = 4  # steps profiled for memory in a row's first, short run (after one warm-up step)  # the SCPL pipeline against the best BP schedule on the same workers
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


def on(device: str, workers: int, row: Row) -> Row:
    """`row` on `device` (cpu, or cuda: each process its own GPU, the threads engine's units on GPUs 0 … workers−1)."""
    if row.engine == "threads":
        devices = ["cpu"] * workers if device == "cpu" else [f"cuda:{i}" for i in range(workers)]
        placement = f"engine.devices=[{','.join(devices)}]"
    else:
        placement = f"engine.device={'cpu' if device == 'cpu' else 'auto' if row.engine in ('pipeline', 'gpipe') else 'cuda:0'}"
    return replace(row, overrides=(*row.overrides, placement))


def rows(workers: int, device: str = "cpu") -> list[Row]:
    return [on(device, workers, row) for row in cpu_rows(workers)]


def cpu_rows(workers: int) -> list[Row]:
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
        Row("vgg_scpl_threads", "vgg", "scpl", "threads", workers, (*VGG, *SCPL_VGG, "engine=threads")),
        Row("vgg_scpl_pipeline", "vgg", "scpl", "pipeline", workers, (*VGG, *SCPL_VGG, "engine=pipeline")),
        Row("transformer_bp1", "transformer", "bp", "sequential", 1, text_bp),
        Row("transformer_bp1_ckpt", "transformer", "bp", "sequential", 1, (*text_bp, "method.checkpoint=true"), checkpoint=True),
        *(bp_pipeline("transformer", text_bp, schedule) for schedule in SCHEDULES),
        Row("transformer_scpl_pipeline", "transformer", "scpl", "pipeline", workers, (*TRANSFORMER, *SCPL_TEXT, "engine=pipeline")),
    ]


def measure(row: Row, first_round: bool, extra: Sequence[str], plans: dict[str, dict]) -> dict[str, float]:
    """One timed run of `row`: what it recorded. In the first round a short profiled run first takes the
    row's memory and its pipeline's split (`plans`); every timed run then uses that split, so the rounds
    differ by the machine's load alone (a split timed anew each run could differ), and profiles nothing."""
    processes = 1 if row.engine in ("sequential", "threads") else row.workers
    if first_round:  # the threads engine: one process of several threads, whose frees the profiler cannot attribute
        profiled = [f"trainer.measure_memory_steps={MEMORY_STEPS}", f"trainer.steps_per_epoch={MEMORY_STEPS + 1}"]
        plans[row.name] = {} if row.engine == "threads" else run_training([*row.overrides, *profiled, *extra], processes).metrics
    stages = plans[row.name].get("placement", {}).get("stages")
    split = [f"engine.stages={json.dumps(stages).replace(' ', '')}"] if stages else []
    return run_training([*row.overrides, *split, *extra], processes).metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python bench/throughput.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds: every row once per round; the table gives medians")
    parser.add_argument("--workers", type=int, default=2, help="processes of the pipelines (stages)")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="which rows, in this order (default: all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides added to every row, e.g. trainer.batch_size=16")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: every process on a GPU of its own (timing synchronised, CUDA's peak memory); add --set trainer.threads=null")
    args = parser.parse_args(argv)
    try:
        check_options({"--rounds": args.rounds, "--workers": args.workers}, {"--rounds": Rule(int, low=1), "--workers": Rule(int, low=1, high=4)})
        known = {row.name: row for row in rows(args.workers, args.device)}
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
    plans: dict[str, dict] = {}
    outcomes = interleaved(chosen, args.rounds, lambda row, r: measure(row, r == 0, args.set, plans),
                           lambda row, r, m, s: print(f"  round {r + 1}/{args.rounds}  {row.name:28s} {m['time/samples_per_s']:8.1f} samples/s"
                                                      f"  ({s:.0f} s)", flush=True))
    print(write(table_of(outcomes, plans), plans, args.rounds, args.out))
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
