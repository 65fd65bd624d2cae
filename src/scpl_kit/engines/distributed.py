"""What every multi-process engine shares: joining torchrun's process group, this process's device,
the number of processes, and a simulated slow worker. (A silent or vanished peer becomes one clear
error through `base.reports_peer_failures`.)"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from scpl_kit.devices import backend_for, local_rank, resolve_device, use_device
from scpl_kit.engines.base import LaunchError


def join_job(backend: str, device: str, timeout_s: float) -> torch.device:
    """Join the process group torchrun described in the environment (once per process) and return
    this process's device: its GPU is made current before the group starts, the backend follows the
    device (devices.backend_for), and NCCL is told the device up front (`device_id`), so no
    collective lands on another rank's GPU."""
    if "RANK" not in os.environ:
        raise LaunchError("this engine runs one process per stage, started by torchrun")
    resolved = resolve_device(device, local_rank() or 0)
    chosen = backend_for(resolved, backend)
    use_device(resolved)
    if not dist.is_initialized():
        # The timeout turns a crashed or stuck peer into an error here instead of a hang.
        dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s), device_id=resolved if chosen == "nccl" else None)
    return resolved


def check_processes(processes: int | None, world: int) -> None:
    """`engine.processes` asks for that many processes; torchrun must have started exactly that many."""
    if processes is not None and processes != world:
        raise ValueError(f"engine.processes={processes} but torchrun started {world} processes; make them agree (or set engine.processes=null)")


def gather_to_main(obj: Any) -> list[Any]:
    """Each rank's `obj`, in rank order, on rank 0; [] on the others (collective)."""
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered or []


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_slowdown(slow_rank: int | None, slowdown: float, world: int) -> None:
    if slowdown < 1:
        raise ValueError(f"engine.slowdown={slowdown} must be >= 1 (how many times slower engine.slow_rank runs)")
    if slow_rank is not None and not 0 <= slow_rank < world:
        raise ValueError(f"engine.slow_rank={slow_rank} is not a rank of the {world} processes")


def simulate_slowness(started: float, slowdown: float) -> None:
    """Make the step that began at `started` (time.perf_counter()) take `slowdown` times as long, by
    sleeping: a heterogeneous worker, for benchmarks and tests, on a machine whose workers are alike."""
    if slowdown > 1:
        time.sleep((slowdown - 1) * (time.perf_counter() - started))
