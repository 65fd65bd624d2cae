"""Scaling on 2 workers (4 in the node-based rows): throughput, communication, memory and time to accuracy of BP and SCPL under
every data- and model-parallel engine, measured in one run (docs/benchmarks.md: rows, columns, targets).

    python bench/scaling.py --out reports            # also the DVC stage `scaling` (params.yaml: scaling)

Every configuration is a real training run of VGG8 on MNIST-5k (the offline profile; `--width`,
`--batch` and `--epochs` set here), `python -m scpl_kit.train` on the configuration's overrides in
fresh processes of one thread each, in interleaved rounds (round r: seed `--seed` + r); the table holds
what the runs wrote. Writes reports/tables/scaling.{csv,md} and reports/figures/scaling.png; exits
with status 1 (after writing them) when a configuration failed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from scpl_kit.bench import Outcome, interleaved, run_training, spread_warnings
from scpl_kit.data.datasets import load_prepared
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.preflight import OneLineParser, PreflightError, Rule, check_options, check_output_dir, fail
from scpl_kit.report.scaling import (
    RoundResult, accuracies, build_table, evaluate_targets, steady_samples_per_s, targets_markdown, time_to_accuracy, write_outputs,
)

MEMORY_STEPS = 5  # the memory run's batches: a warm-up, then 4 profiled (trainer.measure)
# SCPL's projectors average-pool the feature map first (as in bench/throughput.py): the paper's MLP on the
# flattened map is most of SCPL's weights at this size, 39 MB of gradients a step for DDP to all-reduce.
POOLED = "method.pool=true"
ALL_CONFIGS = ("bp1", "ddp", "ddp_slow", "ddp_nodes", "hierarchical", "hierarchical_epoch", "async_sgd", "async_sgd_slow",
               "scpl_pipeline", "gpipe", "ddp_scpl")
NODE_CONFIGS = ("ddp_nodes", "hierarchical", "hierarchical_epoch")  # 2 simulated nodes of --node-ranks ranks each


@dataclass(frozen=True)
class Setup:
    width: float = 0.0625
    batch: int = 32
    epochs: int = 4
    target: float = 0.97
    workers: int = 2
    ranks_per_node: int = 1
    node_ranks: int = 2  # the node-based rows (ddp_nodes, hierarchical*): 2 simulated nodes of this many ranks each
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
    ranks_per_node: int | None = None  # None: the setup's

    def training_overrides(self, setup: Setup, seed: int) -> list[str]:
        return [
            "profile=offline", "data=mnist5k", f"data.processed_dir={setup.processed_dir}", "model=vgg", f"method={self.method}",
            f"engine={self.engine}", *self.overrides,
            f"model.width={setup.width}", f"trainer.batch_size={setup.batch}", f"trainer.epochs={setup.epochs}", f"seed={seed}",
            "trainer.threads=1", "trainer.progress=false", "trainer.resume=false", "trainer.eval_test=false",
            # Recorded like the grid's runs, grouped apart in MLflow (tracking.group); logging happens between epochs, outside the timed steps.
            "tracking.group=scaling", f"tracking.run_name=scaling-{self.name}-s{seed}", "+tracking.tags.bench=scaling",
        ]


def configs(setup: Setup, names: Sequence[str] = ALL_CONFIGS) -> list[Config]:
    w, last = setup.workers, setup.workers - 1
    nodes = f"engine.ranks_per_node={setup.ranks_per_node}"
    slow = (f"engine.slow_rank={last}", f"engine.slowdown={setup.slowdown}")
    timeout = f"engine.timeout_s={setup.timeout_s}"
    # The node-based rows: 2 simulated nodes of `node_ranks` ranks, so the within-node part of the scheme runs too.
    node_workers, in_node = 2 * setup.node_ranks, (f"engine.ranks_per_node={setup.node_ranks}", timeout)
    layout = f"2 nodes × {setup.node_ranks}"
    known = {
        "bp1": Config("bp1", "bp", "sequential", 1),
        "ddp": Config("ddp", "bp", "ddp", w, (nodes, timeout)),
        "ddp_slow": Config("ddp_slow", "bp", "ddp", w, (nodes, *slow, timeout), f"rank {last} slowed {setup.slowdown:g}×"),
        "ddp_nodes": Config("ddp_nodes", "bp", "ddp", node_workers, in_node, layout, setup.node_ranks),
        "hierarchical": Config("hierarchical", "bp", "hierarchical", node_workers, (*in_node, f"engine.average_every={setup.average_every}"),
                               f"K'={setup.average_every}, leaders, {layout}", setup.node_ranks),
        "hierarchical_epoch": Config("hierarchical_epoch", "bp", "hierarchical", node_workers, (*in_node, "engine.average_every=epoch"),
                                     f"K'=epoch, leaders, {layout}", setup.node_ranks),
        "async_sgd": Config("async_sgd", "bp", "async_sgd", w, (timeout,)),
        "async_sgd_slow": Config("async_sgd_slow", "bp", "async_sgd", w, (*slow, timeout), f"rank {last} slowed {setup.slowdown:g}×"),
        "scpl_pipeline": Config("scpl_pipeline", "scpl", "pipeline", w, (POOLED, timeout), "pooled projector"),
        "gpipe": Config("gpipe", "bp", "gpipe", w, (f"engine.microbatches={setup.microbatches}", timeout), f"M={setup.microbatches}"),
        "ddp_scpl": Config("ddp_scpl", "scpl", "ddp", w, (POOLED, nodes, timeout), "pooled projector"),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; valid: {', '.join(known)}")
    return [known[n] for n in names]


# -- measurement: one configuration, one round, in fresh processes ---------------------------------------------

def measure(config: Config, setup: Setup, seed: int, with_memory: bool) -> RoundResult:
    """One round's training run (its history: time, accuracy, the engine's byte counts), and in the first
    round a short measured run for peak memory (trainer.measure; profiling would slow the timed run)."""
    ranks = (config.ranks_per_node or setup.ranks_per_node) if config.workers > 1 else None
    history = run_training(config.training_overrides(setup, seed), config.workers, ranks).history
    memory = math.nan
    if with_memory:
        short = ["trainer.epochs=1", f"trainer.steps_per_epoch={MEMORY_STEPS}", "trainer.measure=true", f"trainer.measure_memory_steps={MEMORY_STEPS - 1}",
                 "tracking.enabled=false"]
        memory = run_training([*config.training_overrides(setup, seed), *short], config.workers, ranks).metrics["memory/peak_mb"]
    tta, epoch = time_to_accuracy(history, setup.target)
    return RoundResult(
        samples_per_s=steady_samples_per_s(history), time_to_acc_s=tta, epochs_to_acc=epoch, final_val_acc=history[-1]["val_acc"],
        intra_node_bytes_per_step=history[-1].get("comm/intra_node_bytes_per_step", 0.0),  # the job's, the last epoch's
        inter_node_bytes_per_step=history[-1].get("comm/inter_node_bytes_per_step", 0.0),
        peak_act_mem_mb=memory, val_accs=tuple(r["val_acc"] for r in history),
    )


def run_all(setup: Setup, names: Sequence[str], rounds: int) -> list[Outcome]:
    def report(config: Config, r: int, result: RoundResult, seconds: float) -> None:
        tta = f"{result.time_to_acc_s:6.1f} s (epoch {result.epochs_to_acc})" if result.epochs_to_acc else "not reached"
        print(f"  round {r + 1}/{rounds}  {config.name:14s} {result.samples_per_s:7.0f} samples/s  val {accuracies(result.val_accs)}  "
              f"to {setup.target:.0%}: {tta}  inter-node {result.inter_node_bytes_per_step:,.0f} B/step"
              + (f"  peak {result.peak_act_mem_mb:.1f} MB" if r == 0 else "") + f"  ({seconds:.0f} s)", flush=True)

    # Memory does not depend on the load: measured in the first round only.
    return interleaved(configs(setup, names), rounds, lambda config, r: measure(config, setup, setup.seed + r, with_memory=r == 0), report)


# What each option may be (argparse has typed them): a value out of range would fail minutes in, in a worker, or never be met (a target above 1).
OPTION_RULES = {
    "--width": Rule(float, positive=True), "--batch": Rule(int, low=1), "--epochs": Rule(int, low=1), "--rounds": Rule(int, low=1),
    "--target": Rule(float, positive=True, high=1), "--workers": Rule(int, low=1), "--ranks-per-node": Rule(int, low=1), "--node-ranks": Rule(int, low=1),
    "--average-every": Rule(int, low=1), "--slowdown": Rule(float, low=1), "--microbatches": Rule(int, low=1), "--seed": Rule(int, low=0),
}


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be known before the first configuration starts: ranges, the batch's divisions,
    the prepared MNIST-5k and its size, a folder for the outputs."""
    check_options({option: getattr(args, option[2:].replace("-", "_")) for option in OPTION_RULES}, OPTION_RULES)
    node_rows = any(c in NODE_CONFIGS for c in args.configs)
    if args.batch % args.workers or args.batch % args.microbatches or (node_rows and args.batch % (2 * args.node_ranks)):
        raise PreflightError(f"--batch {args.batch} must be a multiple of --workers {args.workers}, of --microbatches {args.microbatches} "
                             f"and of the node-based rows' 2 × --node-ranks {args.node_ranks} processes")
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
    parser.add_argument("--node-ranks", "--node_ranks", type=int, default=defaults.node_ranks,
                        help="ranks per node in the node-based rows (ddp_nodes, hierarchical*: 2 nodes)")
    parser.add_argument("--average-every", "--average_every", type=int, default=defaults.average_every, help="hierarchical averaging's K'")
    parser.add_argument("--slowdown", type=float, default=defaults.slowdown, help="how many times slower the slowed worker runs")
    parser.add_argument("--microbatches", type=int, default=defaults.microbatches, help="GPipe's M")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="round r trains with seed + r")
    parser.add_argument("--processed-dir", "--processed_dir", default=defaults.processed_dir, help="where MNIST-5k was prepared")
    parser.add_argument("--configs", nargs="+", default=list(ALL_CONFIGS), choices=ALL_CONFIGS, metavar="CONFIG",
                        help=f"which rows, in this order (default: all: {' '.join(ALL_CONFIGS)})")
    args = parser.parse_args(argv)  # the DVC stage passes params.yaml's `scaling` block as --key value (underscored keys too)
    setup = Setup(args.width, args.batch, args.epochs, args.target, args.workers, args.ranks_per_node, args.node_ranks, args.average_every,
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
    for line in spread_warnings(table, "config"):
        print(line, flush=True)
    print(targets_markdown(verdicts), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
