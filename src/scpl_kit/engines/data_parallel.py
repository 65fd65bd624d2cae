"""Data parallelism (methods.md §5): every process holds every unit, and each batch is split across them.

`ddp`: each unit is wrapped in PyTorch's DistributedDataParallel, so its gradients are averaged over
the processes during its own backward (bucketed, overlapping the computation) before its own
optimizer steps. Each process trains on its equal slice of every batch, so N processes compute the
updates one process computes on the whole batch: per-sample losses average to the batch mean, and a
loss that compares samples (SupCon) sees the whole batch through `batch_group`. BatchNorm normalises
each slice by itself unless `sync_batchnorm` (torch.nn.SyncBatchNorm) is on.

`hierarchical` (node-based communication): ranks are grouped into nodes (torchrun's layout, or
`ranks_per_node` to simulate nodes on one machine). Gradients are averaged within a node every step
and parameters across all ranks every `average_every` steps: post-local SGD, from
torch.distributed.algorithms (the post_localSGD_hook on the intra-node group, and a
PeriodicModelAverager). At the end of every epoch the parameters are averaged too, so evaluation and
checkpoints see one model. A node's share of each batch is its batch: SupCon compares the samples
of the node's slices, so with K' = 1 this equals DDP for per-sample losses (and SGD, whose step is
linear in the gradient), not for SupCon.

    torchrun --nproc-per-node 2 -m scpl_kit.train engine=ddp method=scpl
    torchrun --nnodes 2 --nproc-per-node 4 ... -m scpl_kit.train engine=hierarchical engine.average_every=50

Every process reads whole batches and keeps its slice: the loaders of this kit index tensors held in
memory, so reading N times costs little, and each slice is exactly what a single process would have
trained on (a DistributedSampler would shuffle per process instead).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.algorithms.model_averaging.utils import average_parameters
from torch.nn.parallel import DistributedDataParallel

from scpl_kit import batch_group
from scpl_kit.engines import ENGINES
from scpl_kit.engines.base import Batch, BatchCallback, Engine, LossMeter, ReadoutCollector, as_signal, batch_size
from scpl_kit.engines.distributed import (
    check_processes, check_slowdown, close_distributed, init_distributed, reports_peer_failures, simulate_slowness, stage_device,
)
from scpl_kit.methods.units import LocalUnit, inference_route, moved
from scpl_kit.signal import Signal
from scpl_kit import updater as update

log = logging.getLogger(__name__)
INTRA, INTER = "intra_node", "inter_node"


def slice_of(signal: Signal, rank: int, world: int) -> Signal:
    """Rank `rank`'s share of every sample-indexed tensor of the batch (equal slices, in rank order)."""
    return {name: tensor.tensor_split(world)[rank] for name, tensor in signal.items()}


def check_even_split(example: Signal | None, parts: int, what: str) -> None:
    if example is not None and batch_size(example) % parts:
        raise ValueError(
            f"trainer.batch_size={batch_size(example)} does not split evenly over {parts} {what}: make it a multiple "
            f"of {parts} (each trains on an equal slice of every batch)"
        )


def replicated(unit: LocalUnit, device: torch.device, group: dist.ProcessGroup | None = None) -> DistributedDataParallel:
    """`unit` under DistributedDataParallel over `group` (all ranks: None). DDP broadcasts the weights of
    the group's first rank at the start, and its BatchNorm statistics before every training forward."""
    return DistributedDataParallel(unit, device_ids=[device.index] if device.type == "cuda" else None, process_group=group)


def train_step(unit: LocalUnit, updater: update.Updater, wrapped: DistributedDataParallel | None, signal: Signal) -> tuple[Signal, dict[str, torch.Tensor]]:
    """The unit's training step, with the forward through its DDP wrapper when it has one and computes
    gradients this step (DDP must see the forward of every backward it averages, and expects a backward after each)."""
    return update.train_step(unit, updater, signal, wrapped if wrapped is not None and unit.trains else None)


def predict_in_slices(units: list[LocalUnit], route: list[tuple[int, str]], batches: Iterable[Batch], device: torch.device) -> dict[str, torch.Tensor]:
    """Inference when every process holds the same units: each answers its slice of every batch, and
    the slices come back together, in order, on every process (collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = []
    for batch in batches:
        signal, collected = slice_of(as_signal(batch, with_labels=False), rank, world), ReadoutCollector()
        for i, phase in route:
            signal = units[i].infer(moved(signal, device), phase)
        collected.add(signal)
        parts.append(collected.result())
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, parts)
    names = gathered[0][0].keys() if parts else ()
    return {name: torch.cat([rank_parts[b][name] for b in range(len(parts)) for rank_parts in gathered]) for name in names}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def counted(hook: Callable[..., Any], counter: Counter, key: str) -> Callable[..., Any]:
    """A DDP communication hook that adds the bytes of every gradient bucket it sends to `counter[key]`:
    the payload this process contributes to the all-reduce (a ring all-reduce moves about twice that)."""

    def counting_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        counter[key] += tensor_bytes([bucket.buffer()])
        return hook(state, bucket)

    # DDP checks a hook's annotations as objects; `from __future__ import annotations` made them strings.
    counting_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
    return counting_hook


def node_groups(ranks_per_node: int | None, world: int) -> tuple[int, dist.ProcessGroup]:
    """Ranks per node (torchrun's LOCAL_WORLD_SIZE unless given) and this rank's node's group.
    torchrun numbers the ranks of a node consecutively, which is what new_subgroups groups."""
    size = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if size < 1 or world % size:
        raise ValueError(f"engine.ranks_per_node={size} must divide the {world} processes into equal nodes")
    group, _ = dist.new_subgroups(group_size=size)
    return size, group


class DataParallelEngine(Engine):
    def __init__(self, sync_batchnorm: bool = False, ranks_per_node: int | None = None, average_every: int | None = None,
                 slow_rank: int | None = None, slowdown: float = 1.0, backend: str = "auto", device: str = "auto",
                 timeout_s: float = 300.0, processes: int | None = None) -> None:
        """`average_every`: None is plain DDP (gradients averaged over every rank each step); K′ is
        hierarchical averaging (gradients within a node each step, parameters over all every K′ steps)."""
        if average_every is not None and average_every < 1:
            raise ValueError(f"engine.average_every={average_every} must be >= 1 (steps between averages across nodes)")
        init_distributed(backend, timeout_s)
        self.rank, self.world, self.timeout_s = dist.get_rank(), dist.get_world_size(), timeout_s
        check_processes(processes, self.world)
        check_slowdown(slow_rank, slowdown, self.world)
        self.slowdown = slowdown if slow_rank == self.rank else 1.0  # this worker's simulated slowness
        self.ranks_per_node, self.node_group = node_groups(ranks_per_node, self.world)
        self.nodes = self.world // self.ranks_per_node
        self.sync_batchnorm, self.average_every = sync_batchnorm, average_every
        # The processes whose slices make one batch: all of them under DDP; a node's under hierarchical
        # averaging, where each node learns on its own between averages (SupCon and whole-batch
        # BatchNorm then see the node's batch, and nothing crosses nodes between averages).
        self.batch_group = self.node_group if average_every else dist.group.WORLD
        self.device = stage_device(device)
        self.sent: Counter = Counter()  # bytes this process contributed to collectives, by where they went
        self.units, self.replicas, self.averagers, self.updaters = [], [], [], []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def everywhere(self) -> str:
        """Where a collective over every rank goes: across nodes when there are several."""
        return INTER if self.nodes > 1 else INTRA

    @reports_peer_failures
    def setup(self, units: list[LocalUnit], example: Signal | None = None, recipe: update.UpdateRecipe | None = None) -> None:
        check_even_split(example, self.world, "processes")
        self.units = [self._prepared(unit) for unit in units]
        self.replicas = [self._replicate(unit) for unit in self.units]
        self.attach_updaters(recipe)
        if self.average_every is not None:
            self.averagers = [PeriodicModelAverager(period=self.average_every) for _ in self.units]
        self.route = inference_route(self.units)

    def _prepared(self, unit: LocalUnit) -> LocalUnit:
        unit = unit.to(self.device)
        if not self.sync_batchnorm:
            return unit
        # Converted in place (the unit's BatchNorm layers are replaced); the updaters are built after it.
        # PyTorch's SyncBatchNorm is for GPUs only.
        if self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(unit, process_group=self.batch_group)
        return batch_group.with_whole_batchnorm(unit)

    def _replicate(self, unit: LocalUnit) -> DistributedDataParallel:
        """The unit under DDP, with a communication hook that counts what it sends."""
        replica = replicated(unit, self.device)
        if self.average_every is None:  # the stock all-reduce over every rank, counted
            replica.register_comm_hook(None, counted(default_hooks.allreduce_hook, self.sent, self.everywhere))
        else:  # local SGD from the first step: gradients averaged within the node only
            state = PostLocalSGDState(process_group=None, subgroup=self.node_group, start_localSGD_iter=0)
            within = INTRA if self.ranks_per_node > 1 else "none"  # a one-rank node sends nothing
            replica.register_comm_hook(state, counted(post_localSGD_hook, self.sent, within))
        return replica

    @reports_peer_failures
    def train_epoch(self, batches: Iterable[Batch], on_batch: BatchCallback | None = None) -> dict[str, float]:
        meter, self.steps = LossMeter(), 0
        self.sent.clear()  # the same counter: the communication hooks hold it
        for unit in self.units:
            unit.train()
        with batch_group.spread_over(self.batch_group):
            for batch in batches:
                started, whole = time.perf_counter(), as_signal(batch)
                signal = moved(slice_of(whole, self.rank, self.world), self.device)
                losses = {}
                for i, (unit, replica) in enumerate(zip(self.units, self.replicas)):
                    signal, unit_losses = train_step(unit, self.updaters[i], replica, signal)
                    losses.update(unit_losses)
                    if self.averagers and unit.trains:
                        self._average(self.averagers[i], unit)
                simulate_slowness(started, self.slowdown)
                meter.add(losses)
                self.steps += 1
                if on_batch is not None:
                    on_batch(batch_size(whole))
        if self.averagers:  # one model to evaluate and save
            for unit in self.units:
                self.sent[self.everywhere] += tensor_bytes(unit.parameters())
                average_parameters(iter(unit.parameters()), dist.group.WORLD)
        self.sent[INTRA if self.average_every else self.everywhere] += batch_group.take_sent_bytes()
        return self._epoch_losses(meter)

    def _average(self, averager: PeriodicModelAverager, unit: LocalUnit) -> None:
        """Parameters averaged over every rank when the averager's period comes round (counted)."""
        due = averager.step >= averager.warmup_steps and (averager.step - averager.warmup_steps) % averager.period == 0
        if due:
            self.sent[self.everywhere] += tensor_bytes(unit.parameters())
        averager.average_parameters(unit.parameters())

    def _epoch_losses(self, meter: LossMeter) -> dict[str, float]:
        """Each loss averaged over the ranks: with equal slices, the whole batch's mean (collective)."""
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, meter.means())
        return {name: sum(part[name] for part in gathered) / self.world for name in gathered[0]}

    def epoch_stats(self) -> dict[str, float]:
        """Bytes this process sent per training step in the last epoch, within nodes and across them."""
        steps = max(self.steps, 1)
        return {f"comm/{where}_bytes_per_step": self.sent[where] / steps for where in (INTRA, INTER)}

    @reports_peer_failures
    @torch.no_grad()
    def predict(self, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """Each rank answers its slice of every batch; the slices come back together in order on every rank."""
        for unit in self.units:
            unit.eval()
            for buffer in unit.buffers():  # BatchNorm statistics: rank 0's, as DDP keeps them in training
                dist.broadcast(buffer, 0)
        return predict_in_slices(self.units, self.route, batches, self.device)

    def training_state(self) -> list[dict[str, Any]]:
        """Rank 0's units (every rank holds the same parameters at an epoch's end); [] elsewhere."""
        return super().training_state() if self.is_main else []

    def close(self) -> None:
        close_distributed()


@ENGINES.register("ddp")
def ddp(sync_batchnorm: bool = False, ranks_per_node: int | None = None, slow_rank: int | None = None, slowdown: float = 1.0,
        backend: str = "auto", device: str = "auto", timeout_s: float = 300.0, processes: int | None = None) -> DataParallelEngine:
    return DataParallelEngine(sync_batchnorm, ranks_per_node, None, slow_rank, slowdown, backend, device, timeout_s, processes)


@ENGINES.register("hierarchical")
def hierarchical(average_every: int = 50, ranks_per_node: int | None = None, sync_batchnorm: bool = False, slow_rank: int | None = None,
                 slowdown: float = 1.0, backend: str = "auto", device: str = "auto", timeout_s: float = 300.0,
                 processes: int | None = None) -> DataParallelEngine:
    return DataParallelEngine(sync_batchnorm, ranks_per_node, average_every, slow_rank, slowdown, backend, device, timeout_s, processes)
