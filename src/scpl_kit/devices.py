"""Which device a process computes on, and which torch.distributed backend goes with it: the one place
both are decided, so every engine (one process or many) gets them right the same way.

    auto     the process's GPU when there is one (cuda:LOCAL_RANK under torchrun), else the CPU
    cpu      the CPU
    cuda     the process's GPU (cuda:LOCAL_RANK under torchrun, cuda:0 alone)
    cuda:N   GPU N, for every process that asks (several ranks may share one GPU, over gloo)

A device the machine does not have is refused in one line, before anything is built."""

from __future__ import annotations

import os
import re
from typing import Any

import torch

DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
BACKENDS = ("auto", "gloo", "nccl")


class DeviceError(ValueError):
    """A device, rank or backend this machine cannot give (a user error: reported in one line)."""


def parse_device(spec: str) -> tuple[str, int | None]:
    """('cpu' | 'cuda' | 'auto', the GPU index when one was named)."""
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", str(spec).strip())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"device {spec!r} is not one of {DEVICE_FORMS}")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def describe_gpus(count: int) -> str:
    return "no GPU" if count == 0 else f"{count} GPU{'s' if count > 1 else ''} (cuda:0{f' … cuda:{count - 1}' if count > 1 else ''})"


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """The device `spec` names for this process. `local_rank`: this process's rank on its machine when
    it is one of several (torchrun's LOCAL_RANK), which picks its GPU for `auto` and `cuda`."""
    kind, index = parse_device(spec)
    gpus = gpu_count()
    if kind == "cpu" or (kind == "auto" and gpus == 0):
        return torch.device("cpu")
    if gpus == 0:
        raise DeviceError(f"device {spec!r} asks for a GPU but this machine has none visible to torch (CUDA build: {torch.version.cuda or 'no'}); use cpu or auto")
    if index is None:
        index = local_rank or 0
        if index >= gpus:
            raise DeviceError(
                f"the process with LOCAL_RANK={index} would use cuda:{index}, but this machine has {describe_gpus(gpus)}: start at most "
                f"{gpus} process(es) per machine (Slurm: launcher.gpus_per_node={gpus} with as many tasks per node), or share one GPU with "
                f"engine.device=cuda:0 engine.backend=gloo"
            )
    elif index >= gpus:
        raise DeviceError(f"device {spec!r}: this machine has {describe_gpus(gpus)}")
    return torch.device("cuda", index)


def local_rank() -> int | None:
    """This process's rank on its machine under torchrun (or engine.processes), else None."""
    return int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None


def backend_for(device: torch.device, backend: str = "auto") -> str:
    """The torch.distributed backend for tensors on `device`: NCCL for CUDA, gloo for the CPU. gloo on
    CUDA is allowed (ranks sharing one GPU, which NCCL refuses): the transport then stages
    point-to-point tensors through the host, since gloo's send/recv takes CPU tensors only."""
    if backend not in BACKENDS:
        raise DeviceError(f"engine.backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DeviceError(f"engine.backend=nccl carries CUDA tensors only, but this process computes on {device}: use engine.backend=gloo (or auto)")
    return backend


def use_device(device: torch.device) -> None:
    """Make `device` this process's current GPU: what torch puts an object collective's pickles and
    NCCL's communicators on (else cuda:0, on every rank)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def on_cpu(tree: Any) -> Any:
    """A copy of `tree` (dicts, lists, tuples of tensors and other values) with every tensor on the CPU:
    what is written to disk or gathered to another process, so it loads where no GPU is (or not the same one)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        copied = type(tree)((key, on_cpu(value)) for key, value in tree.items())
        if hasattr(tree, "_metadata"):  # a module's state_dict: the versions load_state_dict reads
            copied._metadata = tree._metadata  # type: ignore[attr-defined]
        return copied
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_cpu(value) for value in tree)
    return tree


def load_on_cpu(path: Any) -> Any:
    """A file torch.save wrote, every tensor on the CPU whatever device it was saved from (a GPU run's
    checkpoint read on a CPU-only host, or by a rank whose GPU is another)."""
    return torch.load(path, map_location="cpu", weights_only=False)
