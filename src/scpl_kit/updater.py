"""The update step: how a unit's losses become new weights. Engines own it; units and methods never step.

A unit declares what it learns from (`local_losses`) and its parameter groups (`parameter_groups`,
with per-group options such as Associated Learning's `lr_scale`). After an engine has placed (or
wrapped) its units, it builds one `Updater` per unit from the run's `UpdateRecipe` (conf/optimizer/):
the optimizer (adam, adamw, sgd), the learning-rate schedule over the epochs the unit trains in,
gradient-norm clipping, gradient accumulation and the precision of the forward pass. Every engine
trains a unit through the same two calls, `forward` and `learn` (or `train_step`, both in one), so
a new training option is a change here, once, for every method under every engine.

Each unit still steps alone on its own losses (BP is one unit), so a decoupled method's updater
never sees another unit's gradient.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.profiler
from omegaconf import OmegaConf
from torch import nn

from scpl_kit.memory import UNIT_SCOPE
from scpl_kit.preflight import check_values
from scpl_kit.signal import Signal

if TYPE_CHECKING:
    from scpl_kit.methods.units import LocalUnit, UnitStep

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step", "plateau")
PRECISIONS = ("fp32", "bf16")


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the unit (block) and the step."""

    def __init__(self, unit: str, loss_name: str, step: int, value: float) -> None:
        super().__init__(
            f"non-finite {loss_name} loss ({value}) in {unit} at step {step}; "
            "lower the learning rate or check the inputs. Metrics logged so far are kept."
        )
        self.unit, self.loss_name, self.step = unit, loss_name, step


# Steps between the host's reads of the non-finite flags: in between, a GPU runs ahead of the host
# instead of waiting at every loss (about one read a second at a paper step's ~20 ms).
CHECK_EVERY = 50


class FiniteWatch:
    """Notes, on the losses' own device, the first step at which each loss of a unit was NaN or
    infinite, without the host waiting for it; `check` reads the notes (the one host sync) and raises
    NonFiniteLossError naming the unit, the loss, the step and its value."""

    def __init__(self, unit: str) -> None:
        self.unit, self.names = unit, ()
        self.first: torch.Tensor | None = None  # per loss: the first non-finite step (0: none yet)
        self.value: torch.Tensor | None = None  # per loss: its value then

    def note(self, losses: dict[str, torch.Tensor], step: int) -> None:
        values = torch.stack([loss.detach().float().reshape(()) for loss in losses.values()])
        if tuple(losses) != self.names or self.first is None or self.first.device != values.device:
            self.check()
            self.names = tuple(losses)
            self.first, self.value = torch.zeros(len(values), dtype=torch.long, device=values.device), torch.zeros_like(values)
        new = ~torch.isfinite(values) & (self.first == 0)
        self.first = torch.where(new, step, self.first)
        self.value = torch.where(new, values, self.value)
        if step % CHECK_EVERY == 0:
            self.check()

    def check(self) -> None:
        if self.first is None:
            return
        found = [(step, i) for i, step in enumerate(self.first.tolist()) if step]  # the host waits here
        if found:
            step, i = min(found)
            raise NonFiniteLossError(self.unit, self.names[i], step, float(self.value[i]))


@dataclass(frozen=True)
class OptimizerSettings:
    """One file of conf/optimizer/ (its keys, `name` included). Bad values are refused here, in one
    line naming the key, before any model is built."""

    name: str = "adam"
    lr: float = 1e-3
    lr_min: float = 1e-5  # where cosine ends; plateau's floor
    weight_decay: float = 0.0  # adam, sgd: L2 added to the gradient; adamw: decoupled
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    momentum: float = 0.0  # sgd
    nesterov: bool = False  # sgd
    schedule: str = "cosine"
    warmup_epochs: float = 0.0  # linear warm-up before the schedule (of the unit's own epochs)
    milestones: tuple[float, ...] = ()  # step: epochs (of the unit's own) after which lr is multiplied by gamma
    gamma: float = 0.1  # step and plateau: the factor
    patience: int = 5  # plateau: epochs without a better validation accuracy before lr is multiplied by gamma
    clip_norm: float | None = None  # gradient-norm clipping (the norm over all of a unit's gradients)
    accumulate: int = 1  # batches whose gradients add up before one step
    precision: str = "fp32"  # bf16: the forward and the losses under autocast (CPU and CUDA)

    def __post_init__(self) -> None:
        for key, value, valid in (("name", self.name, OPTIMIZERS), ("schedule", self.schedule, SCHEDULES), ("precision", self.precision, PRECISIONS)):
            if value not in valid:
                raise ValueError(f"optimizer.{key}={value!r}: valid: {', '.join(valid)}")
        # The numbers against the preflight table (the one a sweep's search space is checked against too).
        check_values(OmegaConf.create({"optimizer": asdict(self)}), under="optimizer.")
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("optimizer.nesterov=true needs optimizer.name=sgd and optimizer.momentum > 0")
        if self.schedule == "plateau" and self.warmup_epochs:
            raise ValueError("optimizer.warmup_epochs must be 0 with optimizer.schedule=plateau (it lowers the rate by validation accuracy)")

    @classmethod
    def from_config(cls, node: Any) -> "OptimizerSettings":
        """From the composed `optimizer` node (a DictConfig or a dict); lists become tuples."""
        plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in plain.items()}
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"optimizer has no key {', '.join(map(repr, unknown))}; valid keys: {', '.join(cls.__dataclass_fields__)}")
        return cls(**values)

    def check_run(self, epochs: int) -> None:
        """What only the run's length can show wrong."""
        if self.warmup_epochs and self.warmup_epochs >= epochs:
            raise ValueError(f"optimizer.warmup_epochs={self.warmup_epochs:g} is not shorter than the run (trainer.epochs={epochs})")
        late = [m for m in self.milestones if not 0 < m < epochs]
        if self.schedule == "step" and late:
            raise ValueError(f"optimizer.milestones {list(self.milestones)}: each must be inside the run's 1..{epochs - 1} epochs")


@dataclass(frozen=True)
class UpdateRecipe:
    """The settings and the run's length: what an engine needs to build each unit's updater."""

    settings: OptimizerSettings
    steps_per_epoch: int  # batches per epoch (each an optimizer step unless accumulating)
    epochs: int

    def updater(self, unit: "LocalUnit", norm_group: Any = None) -> "Updater":
        """`unit`'s updater, over its parameter groups as they are now (build it after placing the unit).
        `norm_group`: a process group whose members hold the other parts of this unit (a pipeline of
        one network's stages), so that clipping sees the whole gradient's norm."""
        return Updater(unit.name, unit.parameter_groups(), self.settings, self.steps_per_epoch, unit.epochs_trained(self.epochs), norm_group)


def build_optimizer(groups: list[dict[str, Any]], settings: OptimizerSettings, device_type: str = "cpu") -> torch.optim.Optimizer:
    """A group's `lr_scale` multiplies the learning rate (e.g. AL's label path)."""
    groups = [{**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": settings.lr * g.get("lr_scale", 1.0)} for g in groups]
    if settings.name == "sgd":
        # Fused on a GPU (one kernel for all tensors); on the CPU the for-each loop the runs were made with.
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov, weight_decay=settings.weight_decay,
                               fused=device_type == "cuda" or None)
    kind = torch.optim.AdamW if settings.name == "adamw" else torch.optim.Adam
    # fused: one kernel over all of a group's tensors instead of a Python loop over them. The narrow
    # offline models have many small tensors: ResNet-18 under SCPL trained in 34 s of CPU instead of
    # 41 s (the for-loop Adam was ~30% of its profile). Same algorithm; deterministic.
    return kind(groups, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay, fused=True)


def build_schedule(optimizer: torch.optim.Optimizer, settings: OptimizerSettings, steps_per_epoch: int, epochs: int) -> Any:
    """torch's own schedulers, stepped once per optimizer step (plateau: once per epoch), over the
    `epochs` the unit trains in. Warm-up: linear from 1/warm-up-steps of the rate up to it."""
    steps = max(steps_per_epoch * epochs, 1)
    warm = round(settings.warmup_epochs * steps_per_epoch)
    schedules = torch.optim.lr_scheduler
    if settings.schedule == "plateau":
        return schedules.ReduceLROnPlateau(optimizer, mode="max", factor=settings.gamma, patience=settings.patience, min_lr=settings.lr_min)
    if settings.schedule == "cosine":
        main = schedules.CosineAnnealingLR(optimizer, T_max=max(steps - warm, 1), eta_min=settings.lr_min)
    elif settings.schedule == "step":
        main = schedules.MultiStepLR(optimizer, milestones=[round(m * steps_per_epoch) - warm for m in settings.milestones], gamma=settings.gamma)
    else:
        main = schedules.LambdaLR(optimizer, lambda step: 1.0)
    if not warm:
        return main
    ramp = schedules.LinearLR(optimizer, start_factor=1 / warm, total_iters=warm)
    return schedules.SequentialLR(optimizer, [ramp, main], milestones=[warm])


@dataclass
class Updater:
    """One unit's optimizer, schedule, clipping, accumulation and precision."""

    unit_name: str
    groups: list[dict[str, Any]]
    settings: OptimizerSettings
    steps_per_epoch: int
    epochs: int
    norm_group: Any = None
    steps: int = 0  # batches learnt from (the step named in a non-finite-loss error)
    pending: int = 0  # batches whose gradients wait for the next optimizer step
    followed: int = 0  # batches other workers trained (`follow`)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: Any = field(init=False)
    watch: FiniteWatch = field(init=False)

    def __post_init__(self) -> None:
        self.watch = FiniteWatch(self.unit_name)
        self.parameters = [p for g in self.groups for p in g["params"]]
        self.device_type = self.parameters[0].device.type if self.parameters else "cpu"
        self.optimizer = build_optimizer(self.groups, self.settings, self.device_type)
        # The schedule counts optimizer steps: with accumulation, fewer than batches.
        self.scheduler = build_schedule(self.optimizer, self.settings, max(self.steps_per_epoch // self.settings.accumulate, 1), self.epochs)
        if self.settings.warmup_epochs and self.settings.warmup_epochs >= self.epochs:
            raise ValueError(
                f"optimizer.warmup_epochs={self.settings.warmup_epochs:g} is not shorter than the {self.epochs} epoch(s) {self.unit_name} trains in"
            )

    # -- the two calls every engine makes --------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16: autocast on the unit's device (thread-local, so each thread that computes enters it)."""
        if self.settings.precision == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, unit: "LocalUnit", signal: Signal, module: nn.Module | None = None) -> "UnitStep":
        """The unit's training forward, through `module` when it is wrapped (DistributedDataParallel
        must see the forward of every backward it averages)."""
        with self.autocast():
            return (module or unit)(signal)

    def learn(self, unit: "LocalUnit", step: "UnitStep") -> dict[str, torch.Tensor]:
        """The unit's local losses of `step`, their backward, and an optimizer step when due."""
        with self.autocast():
            losses = unit.local_losses(step)
        if not losses:  # a unit that does not train this epoch (a frozen deep-cascade module)
            return {}
        self.steps += 1
        self.watch.note(losses, self.steps)
        self.backward(sum(losses.values()))
        self.finish_step()
        return {name: loss.detach().float() for name, loss in losses.items()}

    # -- the parts, for an engine whose schedule runs the backward itself (gpipe) ----------------

    def backward(self, loss: torch.Tensor) -> None:
        self.zero_grad()
        (loss / self.settings.accumulate if self.settings.accumulate > 1 else loss).backward()

    def finish_step(self) -> None:
        """After a batch's backward: step (clipped) when `accumulate` batches have added their gradients."""
        self.pending += 1
        if self.pending < self.settings.accumulate:
            return
        self.pending = 0
        if self.settings.clip_norm is not None:
            self.clip(self.settings.clip_norm)
        self.optimizer.step()
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()

    def clip(self, max_norm: float) -> torch.Tensor:
        """torch's clipping, with the norm summed over `norm_group` when the unit is split across processes."""
        grads = [p.grad for p in self.parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.norm_group is not None:
            import torch.distributed as dist

            squared = norm.pow(2)
            dist.all_reduce(squared, group=self.norm_group)
            norm = squared.sqrt()
        torch.nn.utils.clip_grads_with_norm_([p for p in self.parameters if p.grad is not None], max_norm, norm)
        return norm

    def zero_grad(self) -> None:
        """Before a batch's backward, unless gradients are being accumulated (they stay after a step,
        for inspection, until the next batch's backward)."""
        if self.pending == 0:
            self.optimizer.zero_grad(set_to_none=True)

    def follow(self) -> None:
        """Step the schedule without training (an asynchronous worker, for a batch another one trains)."""
        self.followed += 1
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) or self.followed % self.settings.accumulate:
            return
        with warnings.catch_warnings():  # a schedule that steps before its optimizer ever has: intended here
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before", UserWarning)
            self.scheduler.step()

    def end_epoch(self, val_acc: float) -> None:
        """Reduce-on-plateau's one step per epoch, on the validation accuracy every process sees."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_acc)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- resuming --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]


def train_step(unit: "LocalUnit", updater: Updater, signal: Signal, module: nn.Module | None = None) -> tuple[Signal, dict[str, torch.Tensor]]:
    """One unit on one batch: forward, local losses, update. Returns (detached output, losses). Runs in a
    profiler range named after the unit, so a profiled run can tell each unit's memory apart (memory.py)."""
    with torch.profiler.record_function(UNIT_SCOPE + unit.name):
        step = updater.forward(unit, signal, module)
        return step.handoff(), updater.learn(unit, step)


def updaters_for(units: list["LocalUnit"], settings: OptimizerSettings | None = None, steps_per_epoch: int = 100, epochs: int = 1) -> list[Updater]:
    """Updaters for units outside a run (tests, profiling): Adam at the defaults unless told."""
    recipe = UpdateRecipe(settings or OptimizerSettings(), steps_per_epoch, epochs)
    return [recipe.updater(unit) for unit in units]

