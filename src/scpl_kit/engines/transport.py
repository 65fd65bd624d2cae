"""Every tensor an engine sends to another process (or device) goes through a Transport, which
counts it: the bytes each process puts on the wire per training step, within its node and across
nodes. Engines report the job's totals in `epoch_stats()` (MLflow `comm/...`), so no benchmark has to
wrap torch's functions to see the traffic.

What is counted, per kind of traffic (the bytes the *sending* process contributes, once):
- point to point (`isend`, `send_signal`): the tensors sent, with a signal's short layout header;
- collectives (`counted_hook` for DDP's gradient buckets, `collective` for what an engine reduces
  itself, `broadcast_`): the payload this process contributes (a ring all-reduce moves about twice
  that over the links; we count the payload, which is what an engine can change);
- RPC (`rpc_sync`): the request's tensors and the answer's, both counted for the caller;
- in one process, a signal moved to another device (`moved`): the tensors copied.
A collective over a group of one process sends nothing and counts nothing. Bookkeeping objects at an
epoch's edge (each rank's mean losses, speeds) are not training traffic and are not counted, nor is
the one number the updater all-reduces to clip gradients over BP's pipeline stages (4 bytes a step, with clipping on).
"""

from __future__ import annotations

import os
import pickle
from collections import Counter
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from scpl_kit.signal import Signal, moved

INTRA, INTER = "intra_node", "inter_node"


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def signal_layout(signal: Signal) -> bytes:
    """The names, dtypes and shapes of a signal's tensors: the header a receiver allocates from."""
    return pickle.dumps([(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in signal.items()])


class Transport:
    """This process's view of the job's links. `ranks_per_node`: torchrun's LOCAL_WORLD_SIZE unless
    given (to simulate nodes on one machine); consecutive ranks share a node, as torchrun numbers them."""

    def __init__(self, device: torch.device, ranks_per_node: int | None = None, local: bool = False) -> None:
        """`local`: an engine of one process (its units on one machine's devices), whatever else runs."""
        self.distributed = not local and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.ranks_per_node = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        if self.ranks_per_node < 1 or self.world % self.ranks_per_node:
            raise ValueError(f"engine.ranks_per_node={self.ranks_per_node} must divide the {self.world} processes into equal nodes")
        self.device = device
        self.backend = dist.get_backend() if self.distributed else None
        # gloo sends CPU tensors only: a process on a GPU under gloo (ranks sharing one GPU, which NCCL
        # refuses) copies what it sends to the host first, and what it receives back to its device.
        self.via_host = self.backend == "gloo" and device.type == "cuda"
        # Signal layouts go over the host: a GPU's NCCL would make the receiver wait on its GPU to read
        # one. (Creating a group is collective: every process builds its Transport at the same point.)
        self.host_group = dist.new_group(backend="gloo") if self.backend == "nccl" and self.world > 1 else None
        self.layouts_sent: dict[int, bytes] = {}  # the last layout sent to each peer (sent again only when it changes)
        self.layouts_received: dict[int, list] = {}
        self.sent: Counter = Counter()

    # -- where bytes go ------------------------------------------------------------------------

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def count(self, nbytes: int, peers: Iterable[int]) -> None:
        """`nbytes` sent by this process to `peers` (global ranks): across nodes if any peer is on another."""
        others = [p for p in peers if p != self.rank]
        if others and nbytes:
            self.sent[INTER if any(self.node_of(p) != self.node_of(self.rank) for p in others) else INTRA] += nbytes

    def group_ranks(self, group: dist.ProcessGroup | None) -> list[int]:
        if not self.distributed:
            return [0]
        return dist.get_process_group_ranks(group or dist.group.WORLD)

    # -- point to point ------------------------------------------------------------------------

    def isend(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        """Non-blocking send; the returned work keeps the tensor alive until it is sent."""
        self.count(tensor_bytes([tensor]), [dst])
        return dist.isend(tensor.cpu() if self.via_host else tensor, dst)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        """Into `tensor` (the sender counted it)."""
        if self.via_host:
            staged = torch.empty_like(tensor, device="cpu")
            dist.recv(staged, src)
            tensor.copy_(staged)
        else:
            dist.recv(tensor, src)

    def send_signal(self, signal: Signal, dst: int, pending: list) -> None:
        """A signal's tensors, without blocking, so the stage goes on training while the transfer runs;
        before them, over the host, its layout (names, dtypes, shapes) when it differs from the last one
        sent to `dst`, else an empty one. (dist.send_object_list would pickle the tensors too and block;
        here only the few names and shapes are pickled, and the receiver reuses its buffers.)"""
        layout = signal_layout(signal)
        header = b"" if self.layouts_sent.get(dst) == layout else layout
        self.layouts_sent[dst] = layout
        for part in (torch.tensor([len(header)]), *([torch.frombuffer(bytearray(header), dtype=torch.uint8)] if header else [])):
            self.count(tensor_bytes([part]), [dst])
            pending.append(dist.isend(part, dst, group=self.host_group))
        for tensor in signal.values():
            pending.append(self.isend(tensor.contiguous().to(self.device), dst))

    def recv_signal(self, src: int, into: Signal | None = None) -> Signal:
        """The next signal from rank `src`, received into `into`'s buffers where names and shapes match."""
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src, group=self.host_group)
        length = int(size.numpy()[0])  # a host tensor: reading it waits for the message, never for a GPU
        if length:
            description = torch.empty(length, dtype=torch.uint8)
            dist.recv(description, src, group=self.host_group)
            self.layouts_received[src] = pickle.loads(description.numpy().tobytes())
        signal = {}
        for name, dtype, shape in self.layouts_received[src]:
            buffer = (into or {}).get(name)
            if buffer is None or tuple(buffer.shape) != shape or str(buffer.dtype) != f"torch.{dtype}":
                buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self.recv(buffer, src)
            signal[name] = buffer
        return signal

    def moved(self, signal: Signal, device: torch.device) -> Signal:
        """`signal` on `device`, counting the tensors that change device (one process, several devices)."""
        self.sent[INTRA] += tensor_bytes(t for t in signal.values() if t.device != device)  # one machine: within the node
        return moved(signal, device)

    # -- collectives ---------------------------------------------------------------------------

    def collective(self, nbytes: int, group: dist.ProcessGroup | None = None) -> None:
        """This process contributed `nbytes` to a collective over `group` (None: every rank)."""
        self.count(nbytes, self.group_ranks(group))

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Rank `src`'s `tensors` on every rank (in place); only `src` sends."""
        for tensor in tensors:
            if self.rank == src:
                self.collective(tensor_bytes([tensor]))
            if self.world > 1:
                dist.broadcast(tensor, src)

    def counted_hook(self, hook: Callable[..., Any], group: dist.ProcessGroup | None = None) -> Callable[..., Any]:
        """A DDP communication hook that counts every gradient bucket this process contributes over `group`."""

        def counting_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            self.collective(tensor_bytes([bucket.buffer()]), group)
            return hook(state, bucket)

        # DDP checks a hook's annotations as objects; `from __future__ import annotations` made them strings.
        counting_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
        return counting_hook

    # -- RPC -----------------------------------------------------------------------------------

    def rpc_sync(self, to: int, name: str, fn: Callable[..., list[torch.Tensor]], payload: list[torch.Tensor], *args: Any, timeout: float) -> list[torch.Tensor]:
        """`fn(*args, payload)` run on rank `to` (worker `name`); its answer. Both ways counted here."""
        from torch.distributed import rpc

        answer = rpc.rpc_sync(name, fn, args=(*args, payload), timeout=timeout)
        self.count(tensor_bytes(payload) + tensor_bytes(answer), [to])
        return answer

    # -- accounting ----------------------------------------------------------------------------

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process (bookkeeping: not counted)."""
        if not self.distributed or self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def take_stats(self, steps: int) -> dict[str, float]:
        """The job's bytes per training step since the last call, within and across nodes, summed over
        every process (collective; the sum itself is bookkeeping, not counted), then reset."""
        totals = torch.tensor([float(self.sent[INTRA]), float(self.sent[INTER])], dtype=torch.float64)
        if self.distributed and self.world > 1:
            if self.backend == "nccl":
                totals = totals.to(self.device)  # NCCL reduces tensors on the process's GPU only
            dist.all_reduce(totals)
        self.sent.clear()
        steps = max(steps, 1)
        return {f"comm/{INTRA}_bytes_per_step": float(totals[0]) / steps, f"comm/{INTER}_bytes_per_step": float(totals[1]) / steps}
