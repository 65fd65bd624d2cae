"""Data parallelism (methods.md §5): every process holds every unit, and each batch is split across them.

`ddp`: each unit is wrapped in PyTorch's DistributedDataParallel, so its gradients are averaged over
the processes during its own backward (bucketed, overlapping the computation) before its own
optimizer steps. Each process trains on its equal slice of every batch, so N processes compute the
updates one process computes on the whole batch: per-sample losses average to the batch mean, and a
loss that compares samples (SupCon) sees the whole batch through `batch_group`. BatchNorm normalises
each slice by itself unless `sync_batchnorm` (torch.nn.SyncBatchNorm) is on.

`hierarchical` (node-based communication, Moreno-Alvarez et al., TNNLS 2023; methods.md §5): ranks
are grouped into nodes (torchrun's layout, or `ranks_per_node` to simulate nodes on one machine).
Gradients are averaged within a node every step (post-local SGD's hook from
torch.distributed.algorithms, on the intra-node group), so a node's ranks hold one model; the nodes
learn apart and exchange parameters on a schedule:
- `average_every: epoch`: once per epoch, at its end (the authors' code's default, `--sharingiter -1`);
- `average_every: K′`: every K′ steps (their ImageNet setting is 50), and at every epoch's end too, so
  evaluation and checkpoints see one model.
An exchange averages the parameters across nodes, either
- `exchange: leaders`: one rank per node (its first) all-reduces over a group of the node leaders and
  broadcasts the result within its node: one sender per node on the links between nodes, the
  scheme's point; or
- `exchange: all`: every rank all-reduces over all ranks (the same average, `ranks_per_node` times the
  bytes across nodes; torch's PeriodicModelAverager does this).
A node's share of each batch is its batch: SupCon compares the samples of the node's slices, so with
K' = 1 this equals DDP for per-sample losses (and SGD, whose step is linear in the gradient), not for
SupCon.

    torchrun --nproc-per-node 2 -m scpl_kit.train engine=ddp method=scpl
    torchrun --nnodes 2 --nproc-per-node 4 ... -m scpl_kit.train engine=hierarchical engine.average_every=50

Every process reads only its slice of each batch (`share`; data/share.py): the slices are cut from
the one shuffled sequence every process draws alike, so together they are exactly the batch a single
process would have trained on (a DistributedSampler would shuffle per process instead).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.distributed.algorithms.model_averaging.utils import average_parameters
from torch.nn.parallel import DistributedDataParallel

from scpl_kit import batch_group
from scpl_kit.engines import ENGINES
from scpl_kit.data.share import Share
from scpl_kit.engines.base import Batch, Engine, reports_peer_failures
from scpl_kit.engines.distributed import (
    check_processes, check_slowdown, close_distributed, join_job, simulate_slowness,
)
from scpl_kit.engines.replicas import check_even_split, predict_in_slices, read_share, replicated
from scpl_kit.engines.transport import Transport, tensor_bytes
from scpl_kit.methods.units import LocalUnit, inference_route
from scpl_kit.signal import Signal, moved
from scpl_kit.updater import UpdateRecipe, train_step


EXCHANGES = ("leaders", "all")  # who sends parameters across nodes: each node's first rank, or every rank


class DataParallelEngine(Engine):
    multiprocess = True

    def __init__(self, sync_batchnorm: bool = False, ranks_per_node: int | None = None, average_every: int | str | None = None,
                 slow_rank: int | None = None, slowdown: float = 1.0, backend: str = "auto", device: str = "auto",
                 timeout_s: float = 300.0, processes: int | None = None, exchange: str = "leaders") -> None:
        """`average_every`: None is plain DDP (gradients averaged over every rank each step); K′ or
        "epoch" is hierarchical averaging (gradients within a node each step, parameters across nodes
        every K′ steps or once per epoch), `exchange` saying who sends them across (EXCHANGES)."""
        if average_every is not None and average_every != "epoch" and not (isinstance(average_every, int) and average_every >= 1):
            raise ValueError(f"engine.average_every={average_every!r} must be an integer >= 1 (steps between averages across nodes) or 'epoch'")
        if exchange not in EXCHANGES:
            raise ValueError(f"engine.exchange={exchange!r}: expected one of {', '.join(EXCHANGES)}")
        self.device = join_job(backend, device, timeout_s)
        self.rank, self.world, self.timeout_s = dist.get_rank(), dist.get_world_size(), timeout_s
        check_processes(processes, self.world)
        check_slowdown(slow_rank, slowdown, self.world)
        self.slowdown = slowdown if slow_rank == self.rank else 1.0  # this worker's simulated slowness
        self.transport = Transport(self.device, ranks_per_node)
        # torchrun numbers the ranks of a node consecutively, which is what new_subgroups groups.
        self.node_group, _ = dist.new_subgroups(group_size=self.transport.ranks_per_node)
        self.leader = self.rank - self.rank % self.transport.ranks_per_node  # the first rank of this one's node
        # Made on every rank (creating a group is collective); ranks outside it skip its collectives.
        self.leaders_group = dist.new_group(list(range(0, self.world, self.transport.ranks_per_node)))
        self.sync_batchnorm, self.average_every, self.exchange = sync_batchnorm, average_every, exchange
        # The processes whose slices make one batch: all of them under DDP; a node's under hierarchical
        # averaging, where each node learns on its own between averages (SupCon and whole-batch
        # BatchNorm then see the node's batch, and nothing crosses nodes between averages).
        self.batch_group = self.node_group if average_every else dist.group.WORLD
        self.units, self.replicas, self.updaters = [], [], []
        self.steps_taken: list[int] = []  # per unit: the training steps it took (they time its exchanges)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @reports_peer_failures
    def setup(self, units: list[LocalUnit], example: Signal | None = None, recipe: UpdateRecipe | None = None) -> None:
        check_even_split(example, self.world, "processes")
        self.units = [self._prepared(unit) for unit in units]
        self.replicas = [self._replicate(unit) for unit in self.units]
        self.attach_updaters(recipe)
        self.steps_taken = [0] * len(self.units)
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
            replica.register_comm_hook(None, self.transport.counted_hook(default_hooks.allreduce_hook))
        else:  # local SGD from the first step: gradients averaged within the node only
            state = PostLocalSGDState(process_group=None, subgroup=self.node_group, start_localSGD_iter=0)
            replica.register_comm_hook(state, self.transport.counted_hook(post_localSGD_hook, self.node_group))
        return replica

    def epoch_scope(self) -> contextlib.AbstractContextManager[Any]:
        return batch_group.spread_over(self.batch_group)

    def share(self, training: bool) -> Share:
        return Share(self.rank, self.world)  # in training and inference alike

    def batches_here(self, batches: Iterable[Batch]) -> Iterator[tuple[Signal, int]]:
        for signal, samples in read_share(batches, self.share(training=True)):
            yield moved(signal, self.device), samples

    def train_batch(self, signal: Signal) -> dict[str, torch.Tensor]:
        started, losses = time.perf_counter(), {}
        for k, (unit, replica, updater) in enumerate(zip(self.units, self.replicas, self.updaters)):
            # Through DDP when the unit computes gradients this step (DDP must see the forward of
            # every backward it averages, and expects a backward after each).
            signal, unit_losses = train_step(unit, updater, signal, replica if unit.trains else None)
            losses.update(unit_losses)
            if unit.trains and isinstance(self.average_every, int):
                # As torch's PeriodicModelAverager counts: an exchange after steps 1, K′ + 1, 2K′ + 1, ...
                if self.steps_taken[k] % self.average_every == 0:
                    self._exchange(unit)
                self.steps_taken[k] += 1
        simulate_slowness(started, self.slowdown)
        return losses

    def _exchange(self, unit: LocalUnit) -> None:
        """The unit's parameters averaged across nodes (every rank ends with the average), counted."""
        params = list(unit.parameters())
        if self.exchange == "all":
            self.transport.collective(tensor_bytes(params))
            average_parameters(iter(params), dist.group.WORLD)
            return
        if self.rank == self.leader:  # the others skip the leaders' collective (torch returns at once)
            self.transport.collective(tensor_bytes(params), self.leaders_group)
        average_parameters(iter(params), self.leaders_group)
        if self.transport.ranks_per_node > 1:  # the node's other ranks take their leader's result
            flat = parameters_to_vector(params)
            if self.rank == self.leader:
                self.transport.collective(tensor_bytes([flat]), self.node_group)
            dist.broadcast(flat, src=self.leader, group=self.node_group)
            vector_to_parameters(flat, params)

    def finish_batches(self) -> None:
        if self.average_every is not None:  # the epoch's exchange ("epoch"), or one model to evaluate and save (K′)
            for unit in self.units:
                self._exchange(unit)
        self.transport.collective(batch_group.take_sent_bytes(), self.batch_group)  # SupCon over the slices

    @reports_peer_failures
    @torch.no_grad()
    def predict(self, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """Each rank answers its slice of every batch; the slices come back together in order on every rank."""
        for unit in self.units:
            unit.eval()
            self.transport.broadcast_(unit.buffers())  # BatchNorm statistics: rank 0's, as DDP keeps them in training
        return predict_in_slices(self.units, self.route, batches, self.device)

    def training_state(self) -> list[dict[str, Any]]:
        """Rank 0's units (every rank holds the same parameters at an epoch's end); [] elsewhere."""
        return super().training_state() if self.is_main else []

    def close(self) -> None:
        close_distributed()


@ENGINES.register("ddp")
class DDPEngine(DataParallelEngine):
    def __init__(self, sync_batchnorm: bool = False, ranks_per_node: int | None = None, slow_rank: int | None = None, slowdown: float = 1.0,
                 backend: str = "auto", device: str = "auto", timeout_s: float = 300.0, processes: int | None = None) -> None:
        super().__init__(sync_batchnorm, ranks_per_node, None, slow_rank, slowdown, backend, device, timeout_s, processes)


@ENGINES.register("hierarchical")
class HierarchicalEngine(DataParallelEngine):
    exact = False  # equals DDP only when parameters are averaged every step (and the loss is per sample)

    def __init__(self, average_every: int | str = "epoch", exchange: str = "leaders", ranks_per_node: int | None = None,
                 sync_batchnorm: bool = False, slow_rank: int | None = None, slowdown: float = 1.0, backend: str = "auto",
                 device: str = "auto", timeout_s: float = 300.0, processes: int | None = None) -> None:
        super().__init__(sync_batchnorm, ranks_per_node, average_every, slow_rank, slowdown, backend, device, timeout_s, processes, exchange)
