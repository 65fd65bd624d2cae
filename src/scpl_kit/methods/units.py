"""LocalUnit: what a method turns a model into, and the only thing an engine moves batches between.

What travels between units is a `Signal`: a small dict of named tensors. Every method has
`features` (the activations) and `labels`; a method adds what else its units need (Associated
Learning's label code `code`; a text batch's `lengths`). Engines move, place and send a
signal as a whole without reading the names, so a new method needs no engine change.

A unit owns some blocks (its `body`), an optional local head that gives those blocks their loss,
an optional predictor trained on the unit's detached output, and one optimizer over all of it.
Its output is handed on *detached*, so no gradient ever crosses from one unit to the one before.

Inference visits units along `inference_route`: each unit's `forward` phase in order, then the
`back` phase of the units that have one, last to first (Associated Learning decodes its label code
back through every block). What it leaves in the signal under `scores` is the model's answer;
`exit/<unit>` entries are the readouts of single blocks (an Early-Exit classifier, say).

Losses are named `<where>/<loss>`: `block2/supcon` for a block's local loss, `predictor/ce` for the
classifier's cross-entropy, whichever method trains it, so charts of different methods overlay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from scpl_kit.models.base import run_block
from scpl_kit.signal import FEATURES, INPUT, LABELS, Signal, network_input, summary, without_summary

# Builds a unit's optimizer and schedule from its parameters, or from parameter groups (dicts; a group's
# `lr_scale` multiplies the learning rate), and the share of the run's steps the unit trains in
# (1.0, or 1/K for a deep-cascade module, so its schedule decays over its own stage).
OptimizerFactory = Callable[..., tuple[torch.optim.Optimizer, Any]]
SCORES, EXIT = "scores", "exit/"


def detached(signal: Signal) -> Signal:
    return {name: tensor.detach() for name, tensor in signal.items()}


def moved(signal: Signal, device: torch.device) -> Signal:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in signal.items()}


def readouts(signal: Signal) -> Signal:
    """The class scores a finished inference pass produced: `scores`, and one `exit/<unit>` per
    block readout. A method whose last unit ends in class scores (BP) leaves them as `features`."""
    found = {name: tensor for name, tensor in signal.items() if name.startswith(EXIT)}
    found[SCORES] = signal.get(SCORES, signal[FEATURES])
    return found


@runtime_checkable
class LocalHead(Protocol):
    """What turns a unit's output features into its local loss (SupCon, cross-entropy, ...)."""

    loss_name: str  # the loss is logged as `<unit>/<loss_name>`

    def __call__(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def readout(self, features: torch.Tensor) -> torch.Tensor | None:
        """Class scores from the features when the head is a classifier (an exit), else None."""


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the unit (block) and the step."""

    def __init__(self, unit: str, loss_name: str, step: int, value: float) -> None:
        super().__init__(
            f"non-finite {loss_name} loss ({value}) in {unit} at step {step}; "
            "lower the learning rate or check the inputs. Metrics logged so far are kept."
        )
        self.unit, self.loss_name, self.step = unit, loss_name, step


@dataclass
class UnitStep:
    """One unit's forward on one batch, kept for its learning step: what came in and what goes out
    (with the graph). Engines that overlap one unit's backward with the next unit's forward hold it."""

    inputs: Signal
    outputs: Signal

    def handoff(self) -> Signal:
        return detached(without_summary(self.outputs))


class LocalUnit(nn.Module):
    phases: tuple[str, ...] = ("forward",)  # the inference phases this unit takes part in

    def __init__(
        self, name: str, body: nn.Module, head: LocalHead | None = None, predictor: nn.Module | None = None,
        head_scope: str | None = None, predictor_trains_body: bool = False, carries_input: bool = False,
    ) -> None:
        """`head_scope`: where the head's loss is filed (default: the unit's name). BP's head is the
        end-to-end cross-entropy on the predictor's output, so BP files it under `predictor`.
        `predictor_trains_body`: the predictor's cross-entropy also trains this unit's blocks (the last
        module of DGL, InfoPro and ContSup has the network's classifier as its local head); otherwise
        the predictor learns from a detached copy (SCPL, Early Exit).
        `carries_input`: the unit hands the network's input on as the signal's `input` (for a method
        whose later units read it: InfoPro's reconstruction, ContSup's context)."""
        super().__init__()
        self.name = name
        self.head_scope = head_scope or name
        self.body = body
        self.head = head
        self.predictor = predictor
        self.predictor_trains_body = predictor_trains_body
        self.carries_input = carries_input
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.steps = 0

    def configure_optimizer(self, make: OptimizerFactory) -> None:
        self.optimizer, self.scheduler = make(self.parameters())

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called on every unit before each training epoch (1-based, of `epochs`). A method whose units
        take turns (deep cascade learning) switches them here; the others need nothing."""

    # -- training --------------------------------------------------------------------------------

    def train_step(self, signal: Signal) -> tuple[Signal, dict[str, torch.Tensor]]:
        """Forward, local loss, backward and one optimizer step. Returns (detached output, losses)."""
        step = self.forward_train(signal)
        return step.handoff(), self.learn(step)

    def forward_train(self, signal: Signal) -> UnitStep:
        """The body's forward, keeping the graph for `learn`."""
        return UnitStep(signal, self.run_body(signal))

    def forward(self, signal: Signal) -> UnitStep:
        """The training forward, as `forward_train`: a unit's nn.Module call, so that a data-parallel
        engine can wrap the unit in DistributedDataParallel (which must see the forward to average the
        gradients of the backward that follows)."""
        return self.forward_train(signal)

    @property
    def trains(self) -> bool:
        """Whether this epoch's steps compute gradients (a deep-cascade module's do only on its turn).
        A data-parallel engine averages only the gradients of units that compute them."""
        return True

    def run_body(self, signal: Signal) -> Signal:
        """The body on `signal`, the network's input carried along when the method needs it later."""
        out = run_block(self.body, signal)
        return {**out, INPUT: network_input(signal)} if self.carries_input else out

    def local_losses(self, step: UnitStep) -> dict[str, torch.Tensor]:
        """The losses this unit learns from; a method with another kind of unit overrides this."""
        out, labels = summary(step.outputs), step.outputs[LABELS]
        losses: dict[str, torch.Tensor] = {}
        if self.head is not None:
            losses[self.head_loss_name] = self.head(out, labels)
        if self.predictor is not None:
            # From a detached copy, unless the predictor is this unit's local head: then its gradient
            # reaches this unit's blocks (never an earlier unit's: inputs arrive detached).
            losses["predictor/ce"] = F.cross_entropy(self.predictor(out if self.predictor_trains_body else out.detach()), labels)
        return losses

    @property
    def head_loss_name(self) -> str:
        return f"{self.head_scope}/{self.head.loss_name}"

    def learn(self, step: UnitStep) -> dict[str, torch.Tensor]:
        """Local losses of a forward (from forward_train), backward and one optimizer step."""
        losses = self.local_losses(step)
        self.steps += 1
        for loss_name, loss in losses.items():
            if not torch.isfinite(loss):
                raise NonFiniteLossError(self.name, loss_name, self.steps, loss.item())
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return {name: loss.detach() for name, loss in losses.items()}

    # -- inference -------------------------------------------------------------------------------

    def infer(self, signal: Signal, phase: str = "forward") -> Signal:
        """The body, then the predictor if this unit has one; a classifier head adds this block's
        exit. Projectors are unused."""
        out = self.run_body(signal)
        features = summary(out)
        out = without_summary(out)
        readout = self.head.readout(features) if self.head is not None else None
        if readout is not None:
            out[EXIT + self.name] = readout
        if self.predictor is not None:
            out[SCORES] = self.predictor(features)
        return out

    # -- resuming --------------------------------------------------------------------------------

    def training_state(self) -> dict[str, Any]:
        """Everything needed to resume this unit: weights, optimizer, schedule and step count."""
        return {
            "module": self.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "steps": self.steps,
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]


def inference_route(units: list[LocalUnit]) -> list[tuple[int, str]]:
    """(unit index, phase) in the order inference visits them: every unit forward, then the units
    with a `back` phase from last to first. Every engine runs this same route."""
    forward = [(i, "forward") for i in range(len(units))]
    back = [(i, "back") for i in reversed(range(len(units))) if "back" in units[i].phases]
    return forward + back
