"""Cross-batch pipeline for decoupled methods (methods.md §3, "going beyond"): one process per stage.

A unit needs only the *forward* output of the unit before it, so stage s can train on batch t+1
while stage s+1 trains on batch t. Each stage sees the same inputs in the same order as in the
sequential engine, so the weights come out the same. Processes come from torchrun (one machine or
several) and talk through torch.distributed point-to-point ops: gloo on CPU, NCCL on CUDA.

    torchrun --nproc-per-node 2 -m scpl_kit.train engine=pipeline method=scpl

Why not torch.distributed.pipelining (used by the gpipe engine): its schedules split one
mini-batch and send gradients back between stages; here no gradient crosses a stage and every
stage steps on every batch, so the schedule is just forward sends, which a few isend/recv calls express.

Stages: a pipeline runs at the pace of its slowest stage, and units differ in cost (a VGG's first
block can take several times its last one's time), so an even split by count can waste most of the
speed-up. Unless `stages` are given, rank 0 times one training step of each unit at start-up
(`balance: time`) and every rank takes the split that minimises the slowest stage's time.
"""

from __future__ import annotations

import copy
import functools
import logging
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from scpl_kit.engines import ENGINES
from scpl_kit.engines.base import Batch, BatchCallback, Engine, LossMeter, ReadoutCollector, as_signal, batch_size
from scpl_kit.engines.distributed import (  # noqa: F401  (re-exported: gpipe and tests import them from here)
    check_processes, close_distributed, gather_to_main, init_distributed, reports_peer_failures, stage_device,
)
from scpl_kit import batch_group
from scpl_kit.engines.data_parallel import check_even_split, replicated, slice_of, train_step
from scpl_kit.methods.units import LocalUnit, Signal, inference_route, moved
from scpl_kit.updater import OptimizerSettings, UpdateRecipe

log = logging.getLogger(__name__)
BALANCES = ("time", "count")


def even_stages(n_units: int, n_stages: int) -> list[list[int]]:
    """Consecutive units, as evenly as possible (the first stages take one more when it does not divide)."""
    size, extra = divmod(n_units, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + size + (s < extra))
    return [list(range(bounds[s], bounds[s + 1])) for s in range(n_stages)]


def balanced_stages(times: Sequence[float], n_stages: int) -> list[list[int]]:
    """Consecutive groups of units minimising the slowest stage's total time (exact, by dynamic
    programming over split points; K is small). `times` are measured per-unit step times."""
    n = len(times)
    prefix = [0.0]
    for t in times:
        prefix.append(prefix[-1] + t)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]  # best[s][i]: first i units in s stages
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    groups, i = [], n
    for s in range(n_stages, 0, -1):
        groups.append(list(range(cut[s][i], i)))
        i = cut[s][i]
    return groups[::-1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_chain(steps: Iterable[Callable[[Signal], Signal]], signal: Signal, device: torch.device, repeats: int = 2) -> list[float]:
    """Seconds per call of each step in turn, each fed what the step before returned: one warm-up
    call (it also makes the next step's input, and lazy state such as Adam's moments), then the mean
    of `repeats` timed calls. Under fork_rng, so the run's random streams (dropout, say) come out as
    they went in and the run trains exactly as it would without the measurement."""
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        for step in steps:
            out = step(signal)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                step(signal)
            synchronize(device)
            times.append((time.perf_counter() - start) / repeats)
            signal = out
    return times


def unit_step_times(units: Sequence[LocalUnit], example: Signal, device: torch.device, recipe: UpdateRecipe | None = None) -> list[float]:
    """Seconds of one training step (forward, local loss, backward, update) of each unit on `example`,
    each unit fed the one before's handoff. Each unit is timed on a copy of it, with an updater of its
    own (the run's settings; Adam without a recipe), one at a time on `device`: the units do not change."""

    def trials() -> Iterator[Callable[[Signal], Signal]]:
        for unit in units:
            trial = copy.deepcopy(unit).to(device).train()
            updater = (recipe or UpdateRecipe(OptimizerSettings(), 100, 1)).updater(trial)
            yield lambda signal, trial=trial, updater=updater: train_step(trial, updater, None, signal)[0]

    return time_chain(trials(), moved(example, device), device)


def stage_time(times: Sequence[float], stages: list[list[int]]) -> float:
    """The slowest stage's total time: the pipeline's time per batch, transfers aside."""
    return max(sum(times[i] for i in stage) for stage in stages)


def split_by_time(what: str, times: list[float], n_stages: int) -> list[list[int]]:
    """`balanced_stages` of measured times, logged with the speed-up it promises over the even split."""
    stages, even = balanced_stages(times, n_stages), even_stages(len(times), n_stages)
    log.info(
        "%s' step times %s ms -> stages %s, ideal speed-up %.2fx (sum / slowest stage; the even split %s: %.2fx); "
        "set engine.stages to override",
        what, [round(t * 1e3, 1) for t in times], stages, sum(times) / stage_time(times, stages), even, sum(times) / stage_time(times, even),
    )
    return stages


def wait_sent(pending: list) -> None:
    """Wait for the sends of the batch before, so what they carried is freed before this batch's step.

    The pipeline's next stage receives one batch ahead (see `_inputs`), so the transfer has usually
    finished; when the next stage is slower this is the backpressure that keeps this stage one
    batch ahead. (gloo's send works report completion only once waited on, so polling them would
    not free anything.)
    """
    for work in pending:
        work.wait()
    pending.clear()


def check_stages(stages: list[list[int]], n: int, world: int, what: str) -> None:
    if len(stages) != world or [i for stage in stages for i in stage] != list(range(n)):
        raise ValueError(f"engine.stages {stages} must split {what} 0..{n - 1} into {world} consecutive groups")


class PipelineEngine(Engine):
    def __init__(self, stages: list[list[int]] | None = None, balance: str = "time", backend: str = "auto", device: str = "auto",
                 timeout_s: float = 300.0, processes: int | None = None, replicas: int = 1) -> None:
        """`replicas` R > 1: R copies of the pipeline on R × S processes (2-D parallelism). Ranks
        r·S … r·S + S − 1 are replica r's stages (one node can hold a replica: sends stay within it);
        each replica trains on its slice of every batch, and the R copies of each stage average their
        units' gradients under DistributedDataParallel in a process group of their own."""
        if balance not in BALANCES:
            raise ValueError(f"engine.balance={balance!r}; valid: {', '.join(BALANCES)}")
        init_distributed(backend, timeout_s)
        self.rank, self.world, self.timeout_s = dist.get_rank(), dist.get_world_size(), timeout_s
        check_processes(processes, self.world)
        if replicas < 1 or self.world % replicas:
            raise ValueError(f"engine.replicas={replicas} must divide the {self.world} processes (replicas × stages)")
        self.replicas, self.n_stages = replicas, self.world // replicas
        self.replica, self.stage = divmod(self.rank, self.n_stages)
        # Every rank creates every stage's group, in the same order (torch.distributed requires it).
        self.stage_group, _ = dist.new_subgroups_by_enumeration([[r * self.n_stages + s for r in range(replicas)] for s in range(self.n_stages)])
        self.stages = [list(s) for s in stages] if stages else None
        self.balance = balance
        self.device = stage_device(device)
        self.units, self.wrapped, self.updaters = [], [], []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1

    @reports_peer_failures
    def setup(self, units: list[LocalUnit], example: Signal | None = None, recipe: UpdateRecipe | None = None) -> None:
        if len(units) < self.n_stages:
            raise ValueError(
                f"this method gives {len(units)} unit(s), fewer than the {self.n_stages} pipeline stages: the pipeline "
                "engine is for decoupled methods. For end-to-end BP across devices use engine=gpipe."
            )
        measure = (lambda: unit_step_times(units, example, self.device, recipe)) if example is not None else None
        self.stages = self.stages or self._split(len(units), "units", measure)
        check_stages(self.stages, len(units), self.n_stages, "units")
        self.units = [units[i].to(self.device) for i in self.stages[self.stage]]
        self.route = inference_route(units)
        if self.replicas > 1:
            check_even_split(example, self.replicas, "pipeline replicas")
            self.wrapped = [replicated(unit, self.device, self.stage_group) for unit in self.units]
        self.attach_updaters(recipe)

    @reports_peer_failures
    def _split(self, n: int, what: str, measure: Callable[[], list[float]] | None) -> list[list[int]]:
        """Stages for `n` units (or blocks) when none were given: `balance: time` has rank 0 time each
        of them (`measure`) and sends every rank the split that minimises the slowest stage, so all
        ranks agree even though timings differ from process to process; `count` splits evenly."""
        if self.balance == "count" or self.n_stages == 1:
            return even_stages(n, self.n_stages)
        if measure is None:
            log.info("no example batch to time the %s on; splitting them evenly by count", what)
            return even_stages(n, self.n_stages)
        chosen: list[Any] = [even_stages(n, self.n_stages)]
        if self.is_main:
            try:
                chosen[0] = split_by_time(what, measure(), self.n_stages)
            except Exception as error:  # the split only guides speed: a run whose timing fails may still train
                log.warning("could not time the %s (%s: %s); splitting them evenly by count", what, type(error).__name__, error)
        dist.broadcast_object_list(chosen, src=0)
        return chosen[0]

    # -- point-to-point: a signal's description (names, dtypes, shapes), then each tensor ------------

    def _send(self, signal: Signal, dst: int, pending: list) -> None:
        """Non-blocking, so the stage goes on training while the transfer runs. (dist.send_object_list
        would pickle the tensors too and block; here only the few names and shapes are pickled, and
        the receiver reuses its buffers.)"""
        layout = pickle.dumps([(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in signal.items()])
        description = torch.frombuffer(bytearray(layout), dtype=torch.uint8)
        tensors = [torch.tensor([description.numel()]), description, *(t.contiguous() for t in signal.values())]
        for tensor in tensors:
            pending.append(dist.isend(tensor.to(self.device), dst))  # the work keeps the tensor until sent

    def _recv(self, src: int, into: Signal | None = None) -> Signal:
        """The next signal from rank `src`, received into `into`'s buffers where names and shapes match."""
        size = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.recv(size, src)
        description = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        dist.recv(description, src)
        signal = {}
        for name, dtype, shape in pickle.loads(description.cpu().numpy().tobytes()):
            buffer = (into or {}).get(name)
            if buffer is None or tuple(buffer.shape) != shape or str(buffer.dtype) != f"torch.{dtype}":
                buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            dist.recv(buffer, src)
            signal[name] = buffer
        return signal

    def _inputs(self, batches: Iterable[Batch]) -> Iterable[Signal]:
        """The first stage reads the data; the others receive what the stage before produced,
        one batch ahead in a helper thread, so the transfer of batch t+1 overlaps the training on
        batch t instead of adding to it (the receiving stage is often the slowest one)."""
        if self.is_first:
            for batch in batches:
                yield moved(slice_of(as_signal(batch), self.replica, self.replicas), self.device)
            return
        n = len(batches)  # type: ignore[arg-type]  (a DataLoader: its length, never its data)
        with ThreadPoolExecutor(max_workers=1) as receiver:
            ahead = receiver.submit(self._recv, self.rank - 1) if n else None
            for i in range(n):
                signal = ahead.result()  # re-raises a failed receive (a crashed peer, a timeout) here
                # The next batch's buffers are allocated on this thread, where memory accounting
                # (the profiler, bench/throughput.py) sees them; only a differently shaped last
                # batch gets fresh ones on the receiving thread.
                buffers = {name: torch.empty_like(t) for name, t in signal.items()}
                ahead = receiver.submit(self._recv, self.rank - 1, buffers) if i + 1 < n else None
                yield signal

    @reports_peer_failures
    def train_epoch(self, batches: Iterable[Batch], on_batch: BatchCallback | None = None) -> dict[str, float]:
        meter, pending = LossMeter(), []
        for unit in self.units:
            unit.train()
        with batch_group.spread_over(self.stage_group if self.replicas > 1 else None):
            for signal in self._inputs(batches):
                wait_sent(pending)
                losses = {}
                for i, unit in enumerate(self.units):
                    signal, unit_losses = train_step(unit, self.updaters[i], self.wrapped[i] if self.wrapped else None, signal)
                    losses.update(unit_losses)
                meter.add(losses)
                if not self.is_last:
                    self._send(signal, self.rank + 1, pending)
                if on_batch is not None:
                    on_batch(batch_size(signal) * self.replicas)
        wait_sent(pending)
        return self._epoch_losses(meter)

    def _epoch_losses(self, meter: LossMeter) -> dict[str, float]:
        """Every stage's mean losses, merged, on every rank; a loss of R replicas is their mean, the
        whole batch's (collective)."""
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, meter.means())
        names = {name for part in gathered for name in part}
        return {name: sum(part[name] for part in gathered if name in part) / sum(name in part for part in gathered) for name in names}

    def _segments(self) -> list[tuple[int, list[Callable[[Signal], Signal]]]]:
        """The inference route cut into runs of passes on one rank: (rank, the passes when it is this
        rank's). A route that comes back (AL's inverse chain) visits a rank twice."""
        owner = {i: rank for rank, stage in enumerate(self.stages) for i in stage}
        local = dict(zip(self.stages[self.stage], self.units))
        segments: list[tuple[int, list[Callable[[Signal], Signal]]]] = []
        for i, phase in self.route:
            if not segments or segments[-1][0] != owner[i]:
                segments.append((owner[i], []))
            if owner[i] == self.stage:
                segments[-1][1].append(functools.partial(local[i].infer, phase=phase))
        return segments

    @reports_peer_failures
    @torch.no_grad()
    def predict(self, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        for unit in self.units:
            unit.eval()
        segments, pending, collected = self._segments(), [], ReadoutCollector()
        source = iter(batches) if self.is_first else None
        # Replica 0 answers (the replicas hold the same weights; BatchNorm statistics follow replica 0's).
        for _ in range(len(batches) if self.replica == 0 else 0):  # type: ignore[arg-type]
            batch = next(source) if source is not None else None
            wait_sent(pending)
            for s, (rank, passes) in enumerate(segments):
                if rank != self.stage:
                    continue
                signal = moved(as_signal(batch, with_labels=False), self.device) if s == 0 else self._recv(segments[s - 1][0])
                for run_pass in passes:
                    signal = run_pass(signal)
                if s + 1 < len(segments):
                    self._send(signal, segments[s + 1][0], pending)
                else:
                    collected.add(signal)
        wait_sent(pending)
        result = [collected.result() if segments[-1][0] == self.rank else None]  # stage = rank in replica 0
        dist.broadcast_object_list(result, src=segments[-1][0])  # every rank computes the same accuracy
        return result[0]

    @reports_peer_failures
    def training_state(self) -> list[dict[str, Any]]:
        """All units' states, in order, on the main rank (the only one that writes them); [] elsewhere.
        Replica 0's: the replicas hold the same weights and optimizer states."""
        mine = super().training_state() if self.replica == 0 else []
        return [state for part in gather_to_main(mine) for state in part]

    def load_training_state(self, states: list[dict[str, Any]]) -> None:
        super().load_training_state([states[index] for index in self.stages[self.stage]])

    def close(self) -> None:
        close_distributed()


@ENGINES.register("pipeline")
def pipeline(stages: list[list[int]] | None = None, balance: str = "time", backend: str = "auto", device: str = "auto",
             timeout_s: float = 300.0, processes: int | None = None, replicas: int = 1) -> PipelineEngine:
    return PipelineEngine(stages, balance, backend, device, timeout_s, processes, replicas)
