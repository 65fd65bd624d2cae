"""The interface every engine offers the trainer, and the one batch loop they all run.

Engines know LocalUnit, never a particular method. An engine places its units, then builds each
one's `Updater` from the run's `UpdateRecipe` (`attach_updaters`). Training is `Engine.train_epoch`,
the same loop for every engine; an engine contributes its schedule through a few hooks:

    share(training)        which part of every batch this process reads (its loader reads only that)
    batches_here(batches)  which batches this process trains, as signals on its device (slices, receives)
    train_batch(signal)    one batch through this process's units: the schedule
    epoch_scope()          what holds over the epoch (the group a batch spreads over, a thread pool)
    finish_batches()       after the last batch (pending sends, a final push, parameter averaging)
    epoch_losses(meter)    this epoch's mean losses, merged over the processes

and declares what the rest of the kit needs to know: `multiprocess` (one process per rank, started
by torchrun) and `exact` (computes what the sequential engine computes, or approximates it)."""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Iterator, TypeVar

import torch

from scpl_kit.data.share import WHOLE, Share
from scpl_kit.devices import on_cpu, resolve_device, use_device
from scpl_kit.engines.measure import MEMORY_STEPS, StepMeasure, job_stats
from scpl_kit.engines.transport import Transport
from scpl_kit.methods.units import LocalUnit, inference_route, readouts
from scpl_kit.signal import FEATURES, LABELS, Signal, moved
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


# How gloo and NCCL say that the other side of a send, receive or collective went away or went silent.
PEER_FAILURES = ("Timed out", "timed out", "Connection reset", "Connection closed", "pair closure", "Broken pipe")
F = TypeVar("F", bound=Callable[..., Any])


def reports_peer_failures(method: F) -> F:
    """Turn the backend's error for a silent or vanished peer (a raw gloo/NCCL message and traceback)
    into a PeerError that says what happened and where to look. A multi-process engine has `rank` and `timeout_s`."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except RuntimeError as error:
            # Only a silence or a closed link means a lost peer; any other backend error (a wrong device,
            # an NCCL failure) is reported as itself.
            if isinstance(error, PeerError) or not any(s in str(error) for s in PEER_FAILURES):
                raise
            raise PeerError(
                f"rank {getattr(self, 'rank', 0)}: another rank stopped answering (stuck for engine.timeout_s={getattr(self, 'timeout_s', 0):g} s, or crashed; "
                f"its own log says why). Backend: {str(error).splitlines()[0][:200]}"
            ) from None

    return guarded  # type: ignore[return-value]


class Engine(ABC):
    """Multi-process engines run the trainer on every process; only the main one logs and writes."""

    multiprocess: ClassVar[bool] = False  # one process per rank, started by torchrun (else one process)
    exact: ClassVar[bool] = True  # trains the weights the sequential engine would (False: an approximation)
    units: list[LocalUnit]  # the units this process trains
    updaters: list[Updater]  # one per unit of `units`, built after placing them
    device: torch.device  # this process's (first) device
    transport: Transport  # what every tensor sent to another process or device goes through
    steps_in_epoch: int = 0
    measure: StepMeasure | None = None  # per-step time and peak memory, when the run asks (`measure_steps`)

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

    @reports_peer_failures
    def train_epoch(self, batches: Iterable[Batch], on_batch: BatchCallback | None = None) -> dict[str, float]:
        """Train every unit on every batch; return the mean of each loss, keyed `unit/loss`. The one
        batch loop of the kit: engines differ only in the hooks it calls."""
        meter = LossMeter()
        self.transport.sent.clear()  # this epoch's training traffic only (not set-up, not the last inference)
        for module in self.local_modules():
            module.train()
        with self.epoch_scope():
            if self.measure is not None:
                self.measure.start_epoch()
            for signal, samples in self.batches_here(batches):
                if self.measure is None:
                    meter.add(self.train_batch(signal))
                else:
                    meter.add(self.measure.step(lambda: self.train_batch(signal), samples))  # noqa: B023  (called at once)
                if on_batch is not None:
                    on_batch(samples)
            self.finish_batches()
        for updater in self.updaters:  # a loss that went non-finite since the last check (updater.CHECK_EVERY)
            updater.watch.check()
        self.steps_in_epoch = len(batches) if hasattr(batches, "__len__") else meter.count  # the job's steps: its batches
        return self.epoch_losses(meter)

    def share(self, training: bool) -> Share:
        """The part of every training (or inference) batch this process reads: its loader then reads,
        copies and augments only that part (data/share.py). Engines whose processes each take a slice
        of every batch say which; a process that reads no batch at all never iterates them."""
        return WHOLE

    def batches_here(self, batches: Iterable[Batch]) -> Iterator[tuple[Signal, int]]:
        """(signal, samples) for each batch this process trains: the batch on this process's device,
        and how many samples of the job's batch it stands for (what the progress bar counts)."""
        for batch in batches:
            signal = as_signal(batch)
            yield moved(signal, self.device_of(0)), batch_size(signal)

    @abstractmethod
    def train_batch(self, signal: Signal) -> dict[str, torch.Tensor]:
        """One batch through this process's units, each learning from its losses; the losses."""

    def epoch_scope(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def finish_batches(self) -> None:
        """After the epoch's last batch, before its losses are merged."""

    def epoch_losses(self, meter: "LossMeter") -> dict[str, float]:
        """This process's mean losses merged with the others' (collective): each loss's mean over the
        processes that have it (with equal slices of each batch, the whole batch's; in one process, its own)."""
        return weighted_means(self.transport.gather((meter.means(), 1.0)))

    def device_of(self, index: int) -> torch.device:
        """Where this process's unit `index` runs."""
        return self.device

    def local_modules(self) -> list[torch.nn.Module]:
        """What this process runs, put in training or inference mode as a whole: its units."""
        return list(self.units)

    @abstractmethod
    def predict(self, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """The readouts of every sample of `batches`, in order, on the CPU: `scores` (the model's
        class scores) and `exit/<unit>` for every block with a readout of its own."""

    @property
    def is_main(self) -> bool:
        return True

    def epoch_stats(self) -> dict[str, float]:
        """What the engine measured in the last training epoch, logged with the epoch's record: the
        job's bytes per step within and across nodes (`comm/...`), and what else an engine measures.
        Collective on multi-process engines: every process calls it after `train_epoch`."""
        stats = self.transport.take_stats(self.steps_in_epoch)
        if self.measure is not None:
            stats.update(job_stats(self.transport.gather(self.measure.stats())))
        return stats

    def placement(self) -> dict[str, Any]:
        """Where the units run, for the run's record (metrics.json `placement`): a pipeline's stages, and the
        step times it chose them by; another run given the same `engine.stages` runs the same split."""
        return {}

    def measure_steps(self, memory_steps: int = MEMORY_STEPS, warmup: int = 1) -> None:
        """Time every training step after `warmup`, and take this process's peak memory (`trainer.measure`)."""
        self.measure = StepMeasure(self.device, memory_steps, warmup)

    def end_epoch(self, val_acc: float) -> None:
        """After an epoch's evaluation: the schedules that step on validation accuracy (reduce-on-plateau),
        for the units that trained in the epoch. Every process sees the same accuracy."""
        for unit, updater in zip(self.units, self.updaters):
            if unit.trains:
                updater.end_epoch(val_acc)

    def training_state(self) -> list[dict[str, Any]]:
        """Every unit's state (weights, and its updater's optimizer, schedule and step count), in unit
        order, copied to the CPU (what is written or gathered loads on any host). Multi-process engines:
        collective, and the states arrive on the main process only (the one that writes checkpoints and outputs)."""
        return on_cpu([{"module": unit.state_dict(), **updater.state_dict()} for unit, updater in zip(self.units, self.updaters, strict=True)])

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


class InProcessEngine(Engine):
    """Every unit in this one process, unit i on `device_of(i)`; inference runs the route in order."""

    def __init__(self, devices: list[str]) -> None:
        if not devices:
            raise ValueError("an engine needs at least one device, e.g. devices: [cpu, cpu] or [cuda:0, cuda:1]")
        self.devices = [resolve_device(d) for d in devices]
        self.device = self.devices[0]
        use_device(self.device)
        self.transport = Transport(self.device, local=True)
        self.units, self.updaters = [], []

    def device_of(self, index: int) -> torch.device:
        return self.devices[index % len(self.devices)]

    def setup(self, units: list[LocalUnit], example: Signal | None = None, recipe: UpdateRecipe | None = None) -> None:
        self.units = [unit.to(self.device_of(i)) for i, unit in enumerate(units)]
        self.attach_updaters(recipe)

    @torch.no_grad()
    def predict(self, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        for unit in self.units:
            unit.eval()
        route, collected = inference_route(self.units), ReadoutCollector()
        for batch in batches:
            signal = as_signal(batch, with_labels=False)
            for i, phase in route:
                signal = self.units[i].infer(moved(signal, self.device_of(i)), phase)
            collected.add(signal)
        return collected.result()


def weighted_means(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Each loss's mean over the parts (processes' mean losses) that have it, each part weighted (say,
    by the steps it took)."""
    names = {name for losses, _ in parts for name in losses}
    return {
        name: sum(losses[name] * w for losses, w in parts if name in losses) / sum(w for losses, w in parts if name in losses)
        for name in names
    }
