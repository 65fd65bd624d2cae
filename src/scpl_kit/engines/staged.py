"""What the engines that split a model over processes share (the decoupled pipeline, and BP's
pipelines): torchrun's processes as stages (optionally R replicas of them), choosing the split,
point-to-point inference along the stages, and checkpoints gathered from the stages."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from scpl_kit.engines.balance import check_balance, even_stages, split_by_time, stage_time
from scpl_kit.engines.base import Batch, Engine, ReadoutCollector, as_signal, reports_peer_failures
from scpl_kit.engines.distributed import check_processes, close_distributed, gather_to_main, join_job
from scpl_kit.engines.transport import Transport
from scpl_kit.signal import Signal, moved

log = logging.getLogger(__name__)
Segment = tuple[int, list[Callable[[Signal], Signal]]]  # (stage, the passes it runs when it is this process's)


def wait_sent(pending: list) -> None:
    """Wait for earlier sends, so what they carried is freed before the next step.

    The next stage receives one batch ahead, so the transfer has usually finished; when the next
    stage is slower this is the backpressure that keeps this stage one batch ahead. (gloo's send
    works report completion only once waited on, so polling them would not free anything.)
    """
    for work in pending:
        work.wait()
    pending.clear()


class StagedEngine(Engine):
    """Ranks r·S … r·S + S − 1 are replica r's S stages (one node can hold a replica: sends stay within it)."""

    multiprocess = True

    def __init__(self, stages: list[list[int]] | None = None, balance: str = "time", backend: str = "auto", device: str = "auto",
                 timeout_s: float = 300.0, processes: int | None = None, replicas: int = 1) -> None:
        check_balance(balance)
        self.device = join_job(backend, device, timeout_s)
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
        self.times: list[float] | None = None  # each unit's (block's) step time, when `balance: time` timed them
        self.transport = Transport(self.device)
        self.units, self.updaters, self.pending = [], [], []

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
    def split(self, n: int, what: str, measure: Callable[[], list[float]] | None, groups: int | None = None) -> list[list[int]]:
        """`groups` stages (default: one per process of a replica) for `n` units (or blocks) when none
        were given: `balance: time` has rank 0 time each of them (`measure`) and sends every rank the
        split that minimises the slowest stage, so all ranks agree even though timings differ from
        process to process; `count` splits evenly."""
        groups = groups or self.n_stages
        if self.balance == "count" or groups == 1:
            return even_stages(n, groups)
        if measure is None:
            log.info("no example batch to time the %s on; splitting them evenly by count", what)
            return even_stages(n, groups)
        chosen: list[Any] = [(even_stages(n, groups), None)]
        if self.is_main:
            try:
                times = measure()
                chosen[0] = (split_by_time(what, times, groups), times)
            except Exception as error:  # the split only guides speed: a run whose timing fails may still train
                log.warning("could not time the %s (%s: %s); splitting them evenly by count", what, type(error).__name__, error)
        dist.broadcast_object_list(chosen, src=0)
        stages, self.times = chosen[0]
        return stages

    def ideal_speedup(self, times: list[float]) -> float:
        """The most this split can gain over running every stage on one worker: the sum of the step
        times ÷ the slowest stage's (no pipeline bubble: stages work on different batches)."""
        return sum(times) / stage_time(times, self.stages)

    def placement(self) -> dict[str, Any]:
        return {"stages": self.stages, "step_times_s": self.times}

    def epoch_stats(self) -> dict[str, float]:
        """The engine's measurements, and what the timed split promised (`plan/ideal_speedup`), to set a
        measured speed-up beside."""
        stats = super().epoch_stats()
        if self.times:
            stats["plan/ideal_speedup"] = self.ideal_speedup(self.times)
        return stats

    def finish_batches(self) -> None:
        wait_sent(self.pending)

    def segments(self) -> list[Segment]:
        """The inference route cut into runs of passes on one stage."""
        raise NotImplementedError

    @reports_peer_failures
    @torch.no_grad()
    def predict(self, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        for module in self.local_modules():
            module.eval()
        segments, pending, collected = self.segments(), [], ReadoutCollector()
        source = iter(batches) if self.is_first else None
        # Replica 0 answers (the replicas hold the same weights; BatchNorm statistics follow replica 0's).
        for _ in range(len(batches) if self.replica == 0 else 0):  # type: ignore[arg-type]
            batch = next(source) if source is not None else None
            wait_sent(pending)
            for s, (stage, passes) in enumerate(segments):
                if stage != self.stage:
                    continue
                signal = moved(as_signal(batch, with_labels=False), self.device) if s == 0 else self.transport.recv_signal(segments[s - 1][0])
                for run_pass in passes:
                    signal = run_pass(signal)
                if s + 1 < len(segments):
                    self.transport.send_signal(signal, segments[s + 1][0], pending)
                else:
                    collected.add(signal)
        wait_sent(pending)
        result = [collected.result() if segments[-1][0] == self.rank else None]  # stage = rank in replica 0
        dist.broadcast_object_list(result, src=segments[-1][0])  # every rank computes the same accuracy
        return result[0]

    def close(self) -> None:
        close_distributed()


def gathered_states(mine: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every stage's unit states, in stage order, on the main rank; [] elsewhere (collective)."""
    return [state for part in gather_to_main(mine) for state in part]

