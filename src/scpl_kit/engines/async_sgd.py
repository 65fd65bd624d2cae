"""Asynchronous SGD with bounded staleness, for workers of unequal speed (`async_sgd`).

The kit's stand-in for BPT-CNN's outer layer (Chen et al., TPDS 2019), and not that algorithm: the
paper's data partitioning (IDPA) and global weight update (AGWU) rules could not be read here (only
its abstract is in the stored corpora), so this engine does what its name says, and docs/deviations.md
lists what of BPT-CNN it does not reproduce.

Every process is a worker holding every unit, and rank 0 also hosts a parameter server: the global
weights (every floating-point tensor of every unit's state: parameters, and buffers such as
BatchNorm's running statistics). A worker trains each unit on a whole batch exactly as the
sequential engine does (the unit's own loss and optimizer), then pushes its update (its weights
minus the ones it last pulled) and pulls the current global weights, without waiting for any other
worker. The server applies an update only if it is at most `max_staleness` global updates behind
(updates by others since that worker's last pull); a staler one is dropped, and counted. A push
carries a whole model, so `push_every` K > 1 pushes once per K local steps: less communication,
more staleness.

Speed-proportional shares (the idea, not the rule, of BPT-CNN's IDPA): each epoch's batches are shared out in proportion to the workers'
measured speeds (samples/s of their training steps in the epoch before; for the first epoch, one
timed step at start-up), so a slow worker gets fewer batches and the fast ones do not wait for it.

    torchrun --nproc-per-node 2 -m scpl_kit.train engine=async_sgd method=scpl
    torchrun --nproc-per-node 2 -m scpl_kit.train engine=async_sgd engine.slow_rank=1 engine.slowdown=3   # simulate a slow worker

Communication: torch.distributed.rpc (TensorPipe) for the pushes and pulls, which rank 0 answers on
RPC threads while its own worker trains, and the default process group (gloo/NCCL, as every engine
here) for the collectives at epoch boundaries. Both rendezvous through torchrun's MASTER_ADDR/PORT
(RPC's env:// rendezvous reuses the store the process group opened there). The server's copy lives
on rank 0's device; when every rank trains on a GPU, RPC's device maps send updates and weights
between the GPUs directly (no copy through the host), else they travel as CPU tensors. A push waits
for the server's answer (the pull): that round trip is the algorithm's, not a wait for the GPU; the
worker's speed is timed over the epoch, with one device synchronisation at its end.

At the end of every epoch rank 0 takes the global weights and every rank takes rank 0's state, so
evaluation and checkpoints see one model. Each worker keeps its own optimizer state (Adam's moments);
checkpoints save rank 0's, and a resumed run gives it to every worker.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from scpl_kit.data.share import Share
from scpl_kit.engines import ENGINES
from scpl_kit.engines.balance import synchronize, unit_step_times
from scpl_kit.engines.base import (
    Batch, BatchCallback, Engine, LossMeter, PeerError, batch_size, reports_peer_failures, weighted_means,
)
from scpl_kit.engines.distributed import (
    check_processes, check_slowdown, close_distributed, join_job, simulate_slowness,
)
from scpl_kit.engines.replicas import predict_in_slices, read_share
from scpl_kit.engines.transport import Transport
from scpl_kit.methods.units import LocalUnit, inference_route
from scpl_kit.signal import Signal, moved
from scpl_kit.updater import UpdateRecipe, train_step

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
SERVER_RANK = 0


def worker_name(rank: int) -> str:
    return f"worker{rank}"


class ParameterServer:
    """The global weights (on the CPU) and the bookkeeping of staleness. Thread-safe: rank 0's own
    worker calls it directly while RPC threads serve the others."""

    def __init__(self, weights: Sequence[torch.Tensor], workers: int, max_staleness: int) -> None:
        self.lock = threading.Lock()
        self.workers, self.max_staleness = workers, max_staleness
        self.reset(weights)

    def reset(self, weights: Sequence[torch.Tensor]) -> None:
        """New global weights that every worker holds (start-up, resume), kept where they are given."""
        with self.lock:
            self.weights = [w.detach().clone() for w in weights]
            self.version = 0  # global updates applied so far
            self.pulled = [0] * self.workers  # the version each worker last pulled
            self.updates: list[tuple[int, int, bool]] = []  # (worker, staleness, applied) since take_updates

    def push_pull(self, worker: int, update: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Apply `update` unless it is too stale; return (a copy of) the current global weights."""
        with self.lock:
            staleness = self.version - self.pulled[worker]
            applied = staleness <= self.max_staleness
            if applied:
                torch._foreach_add_(self.weights, list(update))
                self.version += 1
            self.pulled[worker] = self.version
            self.updates.append((worker, staleness, applied))
            log.debug("update from rank %d: staleness %d, %s (global version %d)",
                      worker, staleness, "applied" if applied else "dropped", self.version)
            # Copies: RPC serialises the answer after this returns, when other updates may be landing.
            return [w.clone() for w in self.weights]

    def take_updates(self) -> list[tuple[int, int, bool]]:
        with self.lock:
            updates, self.updates = self.updates, []
            return updates

    def all_pulled(self) -> None:
        """Every worker now holds the current weights (the end of an epoch): nothing is stale."""
        with self.lock:
            self.pulled = [self.version] * self.workers


_server: ParameterServer | None = None  # rank 0's; what the RPCs below reach


def _push_pull(worker: int, update: list[torch.Tensor]) -> list[torch.Tensor]:
    """Runs on rank 0, on an RPC thread, for the worker `worker` (module-level: RPC sends it by name)."""
    assert _server is not None, "the parameter server is not set up on rank 0"
    return _server.push_pull(worker, update)


def interleaved_owners(shares: Sequence[float]) -> Iterator[int]:
    """The worker that trains each batch of the epoch, in turn: the one furthest behind its share
    (smooth weighted round robin). Each worker's batches spread over the whole epoch, so every worker
    is at about the same point of the epoch at any time, and so is its learning-rate schedule."""
    counts = [0] * len(shares)
    for position in itertools.count(1):
        owner = max(range(len(shares)), key=lambda k: shares[k] * position - counts[k])
        counts[owner] += 1
        yield owner


def notes_failure(method: F) -> F:
    """Remember that this process failed in a call, so `close` does not wait for peers that may be gone."""

    @functools.wraps(method)
    def noted(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self.failed = True
            raise

    return noted  # type: ignore[return-value]


@ENGINES.register("async_sgd")
class AsyncSGDEngine(Engine):
    multiprocess = True
    exact = False  # stale updates: not what one process computes

    def __init__(self, max_staleness: int = 4, push_every: int = 1, slow_rank: int | None = None, slowdown: float = 1.0,
                 backend: str = "auto", device: str = "auto", timeout_s: float = 300.0, processes: int | None = None) -> None:
        if push_every < 1:
            raise ValueError(f"engine.push_every={push_every} must be >= 1 (local steps between pushes)")
        if max_staleness < 0:
            raise ValueError(f"engine.max_staleness={max_staleness} must be >= 0 (global updates an applied update may lag behind)")
        self.device = join_job(backend, device, timeout_s)
        self.rank, self.world, self.timeout_s = dist.get_rank(), dist.get_world_size(), timeout_s
        check_processes(processes, self.world)
        check_slowdown(slow_rank, slowdown, self.world)
        self.max_staleness, self.push_every = max_staleness, push_every
        self.slowdown = slowdown if slow_rank == self.rank else 1.0  # this worker's simulated slowness
        self.transport = Transport(self.device)
        devices = self.transport.gather(str(self.device))
        # Where updates and weights live: every rank's GPU when all train on one (RPC maps them), else the CPU.
        self.on_device = all(d.startswith("cuda") for d in devices)
        options = rpc.TensorPipeRpcBackendOptions(init_method="env://", rpc_timeout=timeout_s)
        if self.on_device and self.rank != SERVER_RANK:
            options.set_device_map(worker_name(SERVER_RANK), {self.device: torch.device(devices[SERVER_RANK])})  # answers map back
        with warnings.catch_warnings():  # RPC's start-up uses a deprecated call of its own; nothing to act on
            warnings.simplefilter("ignore", UserWarning)
            rpc.init_rpc(worker_name(self.rank), rank=self.rank, world_size=self.world, rpc_backend_options=options)
        self.failed = False
        self.units, self.shared, self.base, self.updaters = [], [], [], []
        self.speed = 1.0  # samples/s of this worker's steps; equal shares until measured
        self.stats: dict[str, float] = {}
        self.last_updates: list[tuple[int, int, bool]] = []  # rank 0: the server's record of the last epoch

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @notes_failure
    @reports_peer_failures
    def setup(self, units: list[LocalUnit], example: Signal | None = None, recipe: UpdateRecipe | None = None) -> None:
        global _server
        self.units = [unit.to(self.device) for unit in units]
        self.attach_updaters(recipe)
        self.route = inference_route(self.units)
        # What is shared: every floating tensor of the units' state. state_dict's tensors alias the
        # live ones, so copying into them updates the units.
        self.shared = [t for unit in self.units for t in unit.state_dict().values() if t.is_floating_point()]
        if example is not None:  # first epoch's shares: one timed step on copies of the units
            self.speed = batch_size(example) / (sum(unit_step_times(self.units, example, self.device, recipe)) * self.slowdown)
        self._take_rank0_state()
        if self.rank == SERVER_RANK:
            _server = ParameterServer(self.base, self.world, self.max_staleness)
        dist.barrier()  # the server is up before any worker pushes

    def _take_rank0_state(self) -> None:
        """Every rank takes rank 0's whole state (integer buffers too): one model everywhere."""
        self.transport.broadcast_(tensor for unit in self.units for tensor in unit.state_dict().values())
        self.base = self.copy_shared()

    def copy_shared(self) -> list[torch.Tensor]:
        """The shared tensors as they are now, where updates are made and sent (the GPU or the CPU)."""
        return [t.detach().clone() if self.on_device else t.detach().to("cpu", copy=True) for t in self.shared]

    @notes_failure
    def train_epoch(self, batches: Iterable[Batch], on_batch: BatchCallback | None = None) -> dict[str, float]:
        return super().train_epoch(batches, on_batch)

    def epoch_scope(self) -> contextlib.AbstractContextManager[Any]:
        """The epoch's shares of the batches, from the workers' speeds (all_gather doubles as the start line)."""
        speeds = self.transport.gather(self.speed)
        self.shares = [s / sum(speeds) for s in speeds]
        if self.is_main:
            log.info("async_sgd shares of the epoch's batches: %s", ", ".join(
                f"rank {k} {share:.0%} ({speed:.0f} samples/s)" for k, (share, speed) in enumerate(zip(self.shares, speeds))))
        self.steps, self.samples, self.unpushed = 0, 0, 0
        self.started = time.perf_counter()
        return contextlib.nullcontext()

    def share(self, training: bool) -> Share:
        """In training, whole batches: the ones this worker owns this epoch (its loader reads only those,
        from the shuffled sequence every rank draws alike); in inference, a slice of each."""
        return Share(owned=self.owned_batches) if training else Share(self.rank, self.world)

    def owned_batches(self) -> Iterator[bool]:
        """Whether each batch of the epoch is this worker's (asked once the epoch's shares are known)."""
        return (owner == self.rank for owner in interleaved_owners(self.shares))

    def batches_here(self, batches: Iterable[Batch]) -> Iterator[tuple[Signal, int]]:
        for signal, samples in read_share(batches, self.share(training=True)):
            if signal is None:  # another worker's batch
                self._follow_schedules()
                continue
            yield moved(signal, self.device), samples

    def train_batch(self, signal: Signal) -> dict[str, torch.Tensor]:
        start, size, losses = time.perf_counter(), batch_size(signal), {}
        for unit, updater in zip(self.units, self.updaters):
            signal, unit_losses = train_step(unit, updater, signal)
            losses.update(unit_losses)
        if self.slowdown != 1.0:  # a heterogeneous worker (engine.slow_rank): its step's own time, stretched
            synchronize(self.device)
            simulate_slowness(start, self.slowdown)
        self.unpushed += 1
        if self.unpushed == self.push_every:
            self._push_pull()
            self.unpushed = 0
        self.steps, self.samples = self.steps + 1, self.samples + size
        return losses

    def finish_batches(self) -> None:
        if self.unpushed:  # the epoch's last local steps reach the global model too
            self._push_pull()
        synchronize(self.device)
        if self.steps:  # next epoch's share: the worker never waits for another within an epoch, so its
            self.speed = self.samples / (time.perf_counter() - self.started)  # whole epoch is its own work

    def _follow_schedules(self) -> None:
        """Another worker trains this batch. Each unit's learning-rate schedule still steps, so every
        worker's rate follows the run's progress (as under any other engine), not its own step count."""
        for unit, updater in zip(self.units, self.updaters):
            if unit.trains:
                updater.follow()

    def _push_pull(self) -> None:
        """Push this step's update, pull the global weights; no waiting for other workers."""
        update = [t.detach().to(before.device) - before for t, before in zip(self.shared, self.base)]
        if self.rank == SERVER_RANK:
            weights = _server.push_pull(self.rank, update)  # in this process: nothing sent
        else:
            try:
                weights = self.transport.rpc_sync(SERVER_RANK, worker_name(SERVER_RANK), _push_pull, update, self.rank, timeout=self.timeout_s)
            except RuntimeError as error:
                if "On WorkerInfo" in str(error):  # the server's own error, raised there: not a lost peer
                    raise
                raise PeerError(
                    f"rank {self.rank}: the parameter server (rank {SERVER_RANK}) stopped answering (stuck for "
                    f"engine.timeout_s={self.timeout_s:g} s, or crashed; its own log says why). RPC: {str(error).splitlines()[0][:200]}"
                ) from None
        for tensor, weight in zip(self.shared, weights):
            tensor.copy_(weight)
        self.base = weights

    def epoch_losses(self, meter: LossMeter) -> dict[str, float]:
        """Wait for every worker, make rank 0's units the global model on every rank, and sum up: each
        loss's mean over the workers, weighted by the steps each took."""
        report = {"losses": meter.means(), "steps": self.steps, "share": self.shares[self.rank], "speed": self.speed, "finished": time.time()}
        reports = self.transport.gather(report)  # every push of the epoch has landed
        if self.rank == SERVER_RANK:
            for tensor, weight in zip(self.shared, _server.weights):
                tensor.copy_(weight)
            _server.all_pulled()
            self.last_updates = _server.take_updates()
        self._take_rank0_state()
        self.stats = self._stats(reports)
        return weighted_means([(r["losses"], r["steps"]) for r in reports if r["steps"]])

    def _stats(self, reports: list[dict[str, Any]]) -> dict[str, float]:
        """Each worker's share, steps and speed; how long the first to finish waited for the last;
        on rank 0 also the staleness of the applied updates and how many were dropped."""
        stats: dict[str, float] = {"async_sgd/idle_s": max(r["finished"] for r in reports) - min(r["finished"] for r in reports)}
        for k, r in enumerate(reports):
            stats.update({f"async_sgd/rank{k}/share": r["share"], f"async_sgd/rank{k}/steps": r["steps"],
                          f"async_sgd/rank{k}/samples_per_s": r["speed"]})
        if self.rank == SERVER_RANK:
            applied = [staleness for _, staleness, ok in self.last_updates if ok]
            stats.update({
                "async_sgd/updates": len(applied), "async_sgd/dropped": len(self.last_updates) - len(applied),
                "async_sgd/staleness_mean": sum(applied) / max(len(applied), 1), "async_sgd/staleness_max": max(applied, default=0),
            })
        return stats

    def epoch_stats(self) -> dict[str, float]:
        return {**super().epoch_stats(), **self.stats}

    @notes_failure
    @reports_peer_failures
    @torch.no_grad()
    def predict(self, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """Every rank holds the same weights after an epoch: each answers its slice of every batch,
        and the slices come back together in order on every rank."""
        for unit in self.units:
            unit.eval()
        return predict_in_slices(self.units, self.route, batches, self.device)

    def training_state(self) -> list[dict[str, Any]]:
        """Rank 0's units (the global weights, rank 0's optimizer state); [] elsewhere."""
        return super().training_state() if self.is_main else []

    @notes_failure
    def load_training_state(self, states: list[dict[str, Any]]) -> None:
        """Every rank loads the checkpoint; the server starts from its weights. (The next epoch's
        first collective keeps any worker from pushing before the server has them.)"""
        super().load_training_state(states)
        self.base = self.copy_shared()
        if self.rank == SERVER_RANK:
            _server.reset(self.base)

    def close(self) -> None:
        """A graceful RPC shutdown waits for every worker; after a failure, peers may be gone: local only."""
        global _server
        try:
            rpc.shutdown(graceful=not self.failed, timeout=self.timeout_s)
        except RuntimeError as error:
            log.warning("rank %d: RPC shutdown: %s", self.rank, str(error).splitlines()[0][:200])
        _server = None
        close_distributed()
