"""Start ranks on this machine the way torchrun would: for `engine.processes=N`, tests and benchmarks
(across machines, users run torchrun).

Why not torchrun here: its launcher and every rank start a fresh interpreter that imports torch, MLflow
and Hydra anew, about 10 s of a bp_gpipe run that trains for 20 (the DVC pool's runs, docs/results.md).
Here the ranks are forked from a server process that has imported the kit once (multiprocessing's
forkserver, through torch.multiprocessing), each with the environment torchrun gives a rank.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from multiprocessing import reduction
from typing import Any, Callable, Sequence

# What the server imports once, so that every rank it forks starts with them loaded.
PRELOAD = ["scpl_kit.train", "torch.distributed.pipelining", "mlflow"]
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rank_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives rank `rank` of `world` on one machine."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class InheritedFd:
    """One of this process's file descriptors, duplicated into the child that unpickles it: a forked
    server's children would otherwise write to the server's stdout, i.e. that of whichever process
    started the server (in the DVC pool, an earlier stage's log)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Callable[[Any], int], tuple[Any]]:
        return _detached, (reduction.DupFd(self.fd),)


def _detached(duplicate: Any) -> int:
    return duplicate.detach()


def _rank(rank: int, world: int, port: int, ranks_per_node: int | None, out: int, err: int, fn: Callable[..., None], args: Sequence[Any]) -> None:
    for fd, target in ((out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    set_rank_env(rank, world, port)
    os.environ["LOCAL_WORLD_SIZE"] = str(ranks_per_node or world)  # a simulated node, as torchrun describes one
    fn(*args)


def start_local(fn: Callable[..., None], processes: int, args: Sequence[Any] = (), ranks_per_node: int | None = None) -> None:
    """Run `fn(*args)` as ranks 0..processes-1 on this machine and wait for all; `ranks_per_node`: how
    many ranks make a (simulated) node. A rank that raises or exits non-zero raises here
    (torch.multiprocessing's ProcessRaisedException or ProcessExitedException)."""
    import torch.multiprocessing as torch_mp

    if START_METHOD == "forkserver":
        multiprocessing.get_context(START_METHOD).set_forkserver_preload(PRELOAD)
    torch_mp.start_processes(_rank, args=(processes, free_port(), ranks_per_node, InheritedFd(1), InheritedFd(2), fn, tuple(args)),
                             nprocs=processes, join=True, start_method=START_METHOD)
