"""Cross-batch pipeline for decoupled methods (methods.md §3, "going beyond"): one process per stage.

A unit needs only the *forward* output of the unit before it, so stage s can train on batch t+1
while stage s+1 trains on batch t. Each stage sees the same inputs in the same order as in the
sequential engine, so the weights come out the same. Processes come from torchrun (one machine or
several) and talk through torch.distributed point-to-point ops: gloo on CPU, NCCL on CUDA.

    torchrun --nproc-per-node 2 -m scpl_kit.train engine=pipeline method=scpl

Why not torch.distributed.pipelining (used by the pipeline_bp engine): its schedules split one
mini-batch and send gradients back between stages; here no gradient crosses a stage and every
stage steps on every batch, so the schedule is just forward sends, which a few isend/recv calls express.

Stages: unless `stages` are given, rank 0 times one training step of each unit at start-up
(`balance: time`) and every rank takes the split that minimises the slowest stage's time.
`replicas` R > 1: R copies of the pipeline on R × S processes (2-D parallelism); each replica
trains on its slice of every batch, and the R copies of each stage average their units' gradients
under DistributedDataParallel in a process group of their own.
"""

from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from scpl_kit import batch_group
from scpl_kit.engines import ENGINES
from scpl_kit.engines.balance import check_stages, unit_step_times
from scpl_kit.data.share import WHOLE, Share
from scpl_kit.engines.base import Batch, batch_size, reports_peer_failures
from scpl_kit.engines.replicas import check_even_split, read_share, replicated
from scpl_kit.engines.staged import Segment, StagedEngine, gathered_states, wait_sent
from scpl_kit.methods.units import LocalUnit, Signal, inference_route
from scpl_kit.updater import UpdateRecipe, train_step
from scpl_kit.signal import moved


@ENGINES.register("pipeline")
class PipelineEngine(StagedEngine):
    def __init__(self, stages: list[list[int]] | None = None, balance: str = "time", backend: str = "auto", device: str = "auto",
                 timeout_s: float = 300.0, processes: int | None = None, replicas: int = 1) -> None:
        super().__init__(stages, balance, backend, device, timeout_s, processes, replicas)
        self.wrapped = []

    @reports_peer_failures
    def setup(self, units: list[LocalUnit], example: Signal | None = None, recipe: UpdateRecipe | None = None) -> None:
        if len(units) < self.n_stages:
            raise ValueError(
                f"this method gives {len(units)} unit(s), fewer than the {self.n_stages} pipeline stages: the pipeline "
                "engine is for decoupled methods. For end-to-end BP across devices use engine=gpipe."
            )
        measure = (lambda: unit_step_times(units, example, self.device, recipe)) if example is not None else None
        self.stages = self.stages or self.split(len(units), "units", measure)
        check_stages(self.stages, len(units), self.n_stages, "units")
        self.units = [units[i].to(self.device) for i in self.stages[self.stage]]
        self.route = inference_route(units)
        if self.replicas > 1:
            check_even_split(example, self.replicas, "pipeline replicas")
            self.wrapped = [self._replicate(unit) for unit in self.units]
        self.attach_updaters(recipe)

    def _replicate(self, unit: LocalUnit) -> torch.nn.Module:
        replica = replicated(unit, self.device, self.stage_group)
        replica.register_comm_hook(self.stage_group, self.transport.counted_hook(default_hooks.allreduce_hook, self.stage_group))
        return replica

    def share(self, training: bool) -> Share:
        """In training, each replica's first stage reads its replica's slice; in inference, replica 0's
        first stage reads whole batches (staged.py)."""
        return Share(self.replica, self.replicas) if training else WHOLE

    def batches_here(self, batches: Iterable[Batch]) -> Iterator[tuple[Signal, int]]:
        """The first stage reads the data; the others receive what the stage before produced,
        one batch ahead in a helper thread, so the transfer of batch t+1 overlaps the training on
        batch t instead of adding to it (the receiving stage is often the slowest one)."""
        if self.is_first:
            for signal, samples in read_share(batches, self.share(training=True)):
                yield moved(signal, self.device), samples
            return
        n = len(batches)  # type: ignore[arg-type]  (a DataLoader: its length, never its data)
        with ThreadPoolExecutor(max_workers=1) as receiver:
            ahead = receiver.submit(self.transport.recv_signal, self.rank - 1) if n else None
            for i in range(n):
                signal = ahead.result()  # re-raises a failed receive (a crashed peer, a timeout) here
                # The next batch's buffers are allocated on this thread, where memory accounting
                # (the profiler) sees them; only a differently shaped last batch gets fresh ones on
                # the receiving thread.
                buffers = {name: torch.empty_like(t) for name, t in signal.items()}
                ahead = receiver.submit(self.transport.recv_signal, self.rank - 1, buffers) if i + 1 < n else None
                yield signal, batch_size(signal) * self.replicas

    def epoch_scope(self) -> contextlib.AbstractContextManager[Any]:
        return batch_group.spread_over(self.stage_group if self.replicas > 1 else None)

    def train_batch(self, signal: Signal) -> dict[str, torch.Tensor]:
        wait_sent(self.pending)
        losses = {}
        for i, (unit, updater) in enumerate(zip(self.units, self.updaters)):
            # Through the DDP wrapper when replicated and the unit computes gradients this step (DDP
            # must see the forward of every backward it averages, and expects a backward after each).
            wrapper = self.wrapped[i] if self.wrapped and unit.trains else None
            signal, unit_losses = train_step(unit, updater, signal, wrapper)
            losses.update(unit_losses)
        if not self.is_last:
            self.transport.send_signal(signal, self.rank + 1, self.pending)
        return losses

    def finish_batches(self) -> None:
        super().finish_batches()
        self.transport.collective(batch_group.take_sent_bytes(), self.stage_group)  # SupCon over the replicas' slices

    def segments(self) -> list[Segment]:
        """The inference route cut into runs of passes on one rank: (rank, the passes when it is this
        rank's). A route that comes back (AL's inverse chain) visits a rank twice."""
        owner = {i: rank for rank, stage in enumerate(self.stages) for i in stage}
        local = dict(zip(self.stages[self.stage], self.units))
        segments: list[Segment] = []
        for i, phase in self.route:
            if not segments or segments[-1][0] != owner[i]:
                segments.append((owner[i], []))
            if owner[i] == self.stage:
                segments[-1][1].append(functools.partial(local[i].infer, phase=phase))
        return segments

    @reports_peer_failures
    def training_state(self) -> list[dict[str, Any]]:
        """All units' states, in order, on the main rank (the only one that writes them); [] elsewhere.
        Replica 0's: the replicas hold the same weights and optimizer states."""
        return gathered_states(super().training_state() if self.replica == 0 else [])

    def load_training_state(self, states: list[dict[str, Any]]) -> None:
        super().load_training_state([states[index] for index in self.stages[self.stage]])
