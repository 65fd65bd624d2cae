"""The interface every engine offers the trainer. Engines know LocalUnit, never a particular method.

An engine places its units, then builds each one's `Updater` from the run's `UpdateRecipe`
(`attach_updaters`): the update step is the engine's, through the updater every engine shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable

import torch

from scpl_kit.methods.units import LocalUnit, readouts
from scpl_kit.signal import FEATURES, LABELS, Signal
from scpl_kit.updater import UpdateRecipe, Updater

Batch = tuple[torch.Tensor, torch.Tensor] | Signal  # (inputs, labels) from a loader, or already named tensors
BatchCallback = Callable[[int], None]  # called with the number of samples just trained on


def as_signal(batch: Batch, with_labels: bool = True) -> Signal:
    """A loader's batch as the named tensors units exchange; inference leaves the labels behind."""
    signal = dict(batch) if isinstance(batch, dict) else {FEATURES: batch[0], LABELS: batch[1]}
    if not with_labels:
        signal.pop(LABELS, None)
    return signal


def batch_size(signal: Signal) -> int:
    return len(signal[LABELS])


class ReadoutCollector:
    """Gathers each inference batch's readouts (`scores`, `exit/<unit>`) on the CPU, in order."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, signal: Signal) -> None:
        for name, scores in readouts(signal).items():
            self.parts.setdefault(name, []).append(scores.float().cpu())

    def result(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(parts) for name, parts in self.parts.items()}


class LaunchError(RuntimeError):
    """The engine needs processes that were not started (say, no torchrun); the CLI adds the command."""


class PeerError(RuntimeError):
    """Another process of the job stopped answering: stuck, or crashed (its own log says why)."""


def resolve_device(device: str) -> torch.device:
    """`auto` means the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Engine(ABC):
    """Multi-process engines run the trainer on every process; only the main one logs and writes."""

    units: list[LocalUnit]  # the units this process trains
    updaters: list[Updater]  # one per unit of `units`, built after placing them

    @abstractmethod
    def setup(self, units: list[LocalUnit], example: Signal | None = None, recipe: UpdateRecipe | None = None) -> None:
        """Take ownership of the units (place them on their devices), then build their updaters from
        `recipe` (None: an engine for inference only). `example` is one training batch of dummy input
        (`features`, `labels`, and what else the model's batches carry, e.g. text's `lengths`) that an
        engine may time the units on to decide where they run; it must not change the units (nor the
        random streams)."""

    def attach_updaters(self, recipe: UpdateRecipe | None, norm_group: Any = None) -> None:
        """One updater per unit of this process, over the parameters as placed (or wrapped) now."""
        self.updaters = [recipe.updater(unit, norm_group) for unit in self.units] if recipe is not None else []

    @abstractmethod
    def train_epoch(self, batches: Iterable[Batch], on_batch: BatchCallback | None = None) -> dict[str, float]:
        """Train every unit on every batch; return the mean of each loss, keyed `unit/loss`."""

    @abstractmethod
    def predict(self, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """The readouts of every sample of `batches`, in order, on the CPU: `scores` (the model's
        class scores) and `exit/<unit>` for every block with a readout of its own."""

    @property
    def is_main(self) -> bool:
        return True

    def epoch_stats(self) -> dict[str, float]:
        """What the engine measured in the last training epoch, logged with the epoch's record
        (e.g. bytes sent per step); nothing for engines that measure nothing."""
        return {}

    def end_epoch(self, val_acc: float) -> None:
        """After an epoch's evaluation: the schedules that step on validation accuracy (reduce-on-plateau),
        for the units that trained in the epoch. Every process sees the same accuracy."""
        for unit, updater in zip(self.units, self.updaters):
            if unit.trains:
                updater.end_epoch(val_acc)

    def training_state(self) -> list[dict[str, Any]]:
        """Every unit's state (weights, and its updater's optimizer, schedule and step count), in unit
        order. Multi-process engines: collective, and the states arrive on the main process only (the
        one that writes checkpoints and outputs)."""
        return [{"module": unit.state_dict(), **updater.state_dict()} for unit, updater in zip(self.units, self.updaters, strict=True)]

    def load_training_state(self, states: list[dict[str, Any]]) -> None:
        for unit, updater, state in zip(self.units, self.updaters, states, strict=True):
            unit.load_state_dict(state["module"])
            updater.load_state_dict(state)

    def close(self) -> None:
        """Release processes or devices the engine started."""


class LossMeter:
    """Running means of named losses. Sums stay on the losses' device, so the hot loop never waits
    for a GPU: the one device-to-host copy happens in `means()`, at the end of the epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.float()
        self.count += 1

    def means(self) -> dict[str, float]:
        return {name: float(total) / max(self.count, 1) for name, total in self.sums.items()}
