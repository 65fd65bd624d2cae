"""The epoch loop: batches → engine, accuracy on validation and test, listeners, checkpoints.

It knows engines only through the Engine interface and tracking only through listeners.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from scpl_kit.allocator import retain_freed_memory
from scpl_kit.data.augment import Augmentation
from scpl_kit.devices import load_on_cpu
from scpl_kit.data.datasets import Batches, PreparedData
from scpl_kit.engines.base import Engine
from scpl_kit.methods.units import EXIT, SCORES
from scpl_kit.tracking import TrainingListener

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """Raised by a listener to end training on purpose (a sweep's pruner), not because it failed.
    `outcome` and `run_status` say how the tracker records it."""

    outcome = "stopped"
    run_status = "KILLED"


# torch's own thread count for this process (OMP_NUM_THREADS, else the cores): what `threads: null`
# means. Kept here because a process that runs several trainings (the stage pool's workers, a sweep)
# must not carry one run's setting into the next.
DEFAULT_THREADS = torch.get_num_threads()


def configure_torch(threads: int | None, deterministic: bool, tf32: bool = False) -> None:
    """The process's torch settings for a run. Deterministic: the same seed gives the same metrics,
    bitwise; otherwise cuDNN picks its fastest kernels for the shapes it meets (`cudnn.benchmark`).
    `tf32`: float32 matrix products and convolutions on a GPU's TensorFloat-32 units (10 mantissa bits
    in the products, float32 sums); off, they stay float32. Neither changes anything on the CPU."""
    retain_freed_memory()
    torch.set_num_threads(threads or DEFAULT_THREADS)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs this to be deterministic
    # What torch.use_deterministic_algorithms(…, warn_only=True) does, minus its import of
    # torch._inductor to mirror the flag into the compiler's config: 1.6 s per process (measured),
    # for a compiler nothing here uses. torch is pinned exactly (pyproject.toml).
    torch._C._set_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch reseeds shuffling and augmentation, so a resumed run draws exactly what an
    uninterrupted one would without saving any RNG state."""
    return seed * 100_003 + epoch


def accuracy(scores: torch.Tensor, labels: np.ndarray) -> float:
    return float((scores.argmax(dim=1).numpy() == np.asarray(labels)).mean())


def split_accuracies(split: str, readouts: dict[str, torch.Tensor], labels: np.ndarray) -> dict[str, float]:
    """`<split>_acc` of the model's scores, and `<split>_acc/<unit>` of every block's own readout."""
    return {
        f"{split}_acc" if name == SCORES else f"{split}_acc/{name.removeprefix(EXIT)}": accuracy(scores, labels)
        for name, scores in readouts.items()
    }


@dataclass
class BestWeights:
    """The weights of the epoch with the best validation accuracy (the first such epoch on ties, as
    in `summarize`): the model whose test accuracy the run reports, and the one it saves."""

    epoch: int = 0
    val_acc: float = float("-inf")
    modules: list[dict[str, Any]] | None = None

    def offer(self, epoch: int, val_acc: float, units: list[dict[str, Any]]) -> None:
        if val_acc > self.val_acc:
            # Kept as given: Engine.training_state's states are CPU copies, which the next step does not change.
            self.epoch, self.val_acc, self.modules = epoch, val_acc, [unit["module"] for unit in units]


@dataclass
class Checkpoint:
    """The state after the last finished epoch, written atomically so a kill never leaves half a file."""

    path: Path

    def save(self, epoch: int, units: list[dict[str, Any]], history: list[dict[str, float]], run_id: str | None, best: BestWeights) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"epoch": epoch, "units": units, "history": history, "run_id": run_id, "best": best}, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        return load_on_cpu(self.path) if self.path.is_file() else None  # the engine moves each tensor to its unit's device

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class Trainer:
    engine: Engine
    data: PreparedData
    epochs: int
    batch_size: int
    eval_batch_size: int
    augmentation: Augmentation
    seed: int
    progress: bool = True
    listeners: list[TrainingListener] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    run_id: str | None = None
    eval_test: bool = True  # off in sweeps: model selection must never see the test split
    best: BestWeights = field(default_factory=BestWeights)  # filled on the main process only
    stop_at_val_acc: float | None = None  # end after the first epoch reaching it (every process sees the same accuracy)
    steps_per_epoch: int | None = None  # train on this many batches an epoch (a random subset of the split); None: all of it
    num_workers: int = 0  # loader processes (data.num_workers), started once and kept over the epochs
    loaders: dict[str, Batches] = field(default_factory=dict, init=False)
    shuffle: torch.Generator = field(default_factory=torch.Generator, init=False)  # reseeded every epoch

    def fit(self, start_epoch: int = 1, history: list[dict[str, float]] | None = None) -> list[dict[str, float]]:
        history = list(history or [])
        for epoch in range(start_epoch, self.epochs + 1):
            record = self.run_epoch(epoch)
            self.engine.end_epoch(record["val_acc"])  # reduce-on-plateau schedules
            history.append(record)
            if self.engine.is_main:
                log.info("epoch %d/%d  %s", epoch, self.epochs, "  ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
            for listener in self.listeners:
                listener.on_epoch_end(epoch, record)
            units = self.engine.training_state()  # collective: every process takes part
            if self.engine.is_main:
                self.best.offer(epoch, record["val_acc"], units)
                if self.checkpoint is not None:
                    self.checkpoint.save(epoch, units, history, self.run_id, self.best)
            if self.stop_at_val_acc is not None and record["val_acc"] >= self.stop_at_val_acc:
                if self.engine.is_main:
                    log.info("val_acc %.4f reached trainer.stop_at_val_acc=%g: stopping after epoch %d", record["val_acc"], self.stop_at_val_acc, epoch)
                break
        return history

    def run_epoch(self, epoch: int) -> dict[str, float]:
        torch.manual_seed(epoch_seed(self.seed, epoch))
        self.shuffle.manual_seed(epoch_seed(self.seed, epoch))  # this epoch's order and augmentation, whatever came before
        train = self.loader("train")
        for unit in self.engine.units:  # this process's units
            unit.start_epoch(epoch, self.epochs)
        samples = len(train) * self.batch_size * self.augmentation.views
        start = time.perf_counter()
        with tqdm(total=samples, desc=f"epoch {epoch}/{self.epochs}", unit="img", leave=False, mininterval=1.0, disable=not (self.progress and self.engine.is_main)) as bar:
            losses = self.engine.train_epoch(train, on_batch=bar.update)
        train_time = time.perf_counter() - start
        record: dict[str, float] = {"epoch": epoch, **{f"loss/{name}": value for name, value in losses.items()}, **self.engine.epoch_stats()}
        for split in ("val", "test") if self.eval_test else ("val",):
            record.update(split_accuracies(split, self.engine.predict(self.loader(split)), self.data.splits[split][1]))
        record.update(train_time_s=train_time, epoch_time_s=time.perf_counter() - start, samples_per_s=samples / train_time)
        return record


    def loader(self, split: str) -> Batches:
        """`split`'s batches on the engine's input device; made once, so loader workers live through the run."""
        if split not in self.loaders:
            training = split == "train"
            self.loaders[split] = self.data.loader(
                split, self.batch_size if training else self.eval_batch_size, shuffle=training, augmentation=self.augmentation if training else None,
                generator=self.shuffle if training else None, num_workers=self.num_workers, drop_last=training,
                max_batches=self.steps_per_epoch if training else None, device=self.engine.device, share=self.engine.share(training),
            )
        return self.loaders[split]


# The epoch records' measurements (engines/measure.py, transport.py) and what a pipeline's split promised (staged.py).
MEASURED = ("time/", "memory/", "comm/", "plan/")


def summarize(history: list[dict[str, float]]) -> dict[str, float]:
    """Final metrics. `test_acc` is taken at the epoch of best *validation* accuracy (honest model
    selection); `best_test_acc` is the paper's metric (best test accuracy over epochs)."""
    best = max(history, key=lambda r: r["val_acc"])  # the first epoch reaching the best, on ties
    summary = {
        "best_val_acc": best["val_acc"],
        "best_val_epoch": best["epoch"],
        "final_val_acc": history[-1]["val_acc"],
        "train_time_s": sum(r["train_time_s"] for r in history),
        "samples_per_s": float(np.mean([r["samples_per_s"] for r in history])),
    }
    # What the run measured of itself (trainer.measure), in its last epoch: the steady state.
    summary.update({name: value for name, value in history[-1].items() if name.startswith(MEASURED)})
    if "test_acc" in best:
        summary.update(
            test_acc=best["test_acc"], best_test_acc=max(r["test_acc"] for r in history), final_test_acc=history[-1]["test_acc"]
        )
        # Each block's readout at the selected epoch: the paper's "accuracy per layer".
        summary.update({name: value for name, value in best.items() if name.startswith("test_acc/")})
    return summary
