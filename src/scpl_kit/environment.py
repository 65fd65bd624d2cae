"""What a run's numbers depend on beyond the code and data: the processor, the thread count and the
library versions. Runs are bitwise repeatable on the same machine and thread count; across CPU types
floating-point kernels differ (seeds moved by up to 0.5 points), so every run records where it ran."""

from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

LIBRARIES = ("torchvision", "numpy", "mlflow", "optuna")


@cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def describe() -> dict[str, str]:
    """The environment of this process, as strings (MLflow tags, table headers)."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu_model(),
        "torch_threads": str(torch.get_num_threads()),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,  # with its build, e.g. +cu130: CPU and CUDA builds differ in kernels
        **{name: library_version(name) for name in LIBRARIES},
    }


def one_line(environment: dict[str, str]) -> str:
    """For a table's header: `Intel Xeon …, 2 torch threads, no GPU, Python 3.11.7, torch 2.14.1, …`."""
    gpu = "no GPU" if environment["gpu"] == "none" else environment["gpu"]
    versions = ", ".join(f"{name} {environment[name]}" for name in ("python", "torch", *LIBRARIES))
    return f"{environment['cpu']}, {environment['torch_threads']} torch threads, {gpu}, {versions}"
