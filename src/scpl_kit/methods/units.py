"""LocalUnit: what a method turns a model into, and the only thing an engine moves batches between.

What travels between units is a `Signal`: a small dict of named tensors. Every method has
`features` (the activations) and `labels`; a method adds what else its units need (Associated
Learning's label code `code`; a text batch's `lengths`). Engines move, place and send a
signal as a whole without reading the names, so a new method needs no engine change.

A unit owns some blocks (its `body`), an optional local head that gives those blocks their loss,
and an optional predictor trained on the unit's detached output. It declares its losses
(`local_losses`) and its parameter groups; the engine's `Updater` (scpl_kit.updater) turns the losses
into a step, so no unit builds or steps an optimizer. Its output is handed on *detached*, so no
gradient ever crosses from one unit to the one before.

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
from scpl_kit.updater import NonFiniteLossError  # noqa: F401  (re-exported: a unit's loss is what goes non-finite)

SCORES, EXIT = "scores", "exit/"


def detached(signal: Signal) -> Signal:
    return {name: tensor.detach() for name, tensor in signal.items()}


def readouts(signal: Signal) -> Signal:
    """The class scores a finished inference pass produced: `scores`, and one `exit/<unit>` per
    block readout. A method whose last unit ends in class scores (BP) leaves them as `features`."""
    found = {name: tensor for name, tensor in signal.items() if name.startswith(EXIT)}
    found[SCORES] = signal.get(SCORES, signal[FEATURES])
    return found


@runtime_checkable
class LocalHead(Protocol):
    """What turns a unit's output features into its local loss (SupCon, cross-entropy, ...). A head whose
    loss is a weighted sum of several terms (PredSim, DeInfoReg) may also have `terms(features, labels)`,
    a dict of the weighted terms: the unit then logs each as `<unit>/<term>` and descends their sum."""

    loss_name: str  # the loss is logged as `<unit>/<loss_name>`

    def __call__(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def readout(self, features: torch.Tensor) -> torch.Tensor | None:
        """Class scores from the features when the head is a classifier (an exit), else None."""


@dataclass
class UnitStep:
    """One unit's forward on one batch, kept for its learning step: what came in and what goes out
    (with the graph). Engines that overlap one unit's backward with the next unit's forward hold it."""

    inputs: Signal
    outputs: Signal

    def handoff(self) -> Signal:
        return detached(without_summary(self.outputs))


@dataclass
class Network:
    """A unit that is one network trained end to end (BP), as the engines that split a network into
    pipeline stages need it: its blocks in order, the predictor after the last, the loss on the
    predictor's class scores, and one sample's signal as the first block takes it (names, shapes)."""

    blocks: list[nn.Module]
    predictor: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    loss_name: str
    example: Signal
    checkpoint: bool = False  # each block under activation checkpointing


class LocalUnit(nn.Module):
    phases: tuple[str, ...] = ("forward",)  # the inference phases this unit takes part in

    def __init__(
        self, name: str, body: nn.Module, head: LocalHead | None = None, predictor: nn.Module | None = None,
        head_scope: str | None = None, predictor_trains_body: bool = False, carries_input: bool = False,
        head_answers: bool = False,
    ) -> None:
        """`head_scope`: where the head's loss is filed (default: the unit's name). BP's head is the
        end-to-end cross-entropy on the predictor's output, so BP files it under `predictor`.
        `predictor_trains_body`: the predictor's cross-entropy also trains this unit's blocks (the last
        module of DGL, InfoPro and ContSup has the network's classifier as its local head); otherwise
        the predictor learns from a detached copy (SCPL, Early Exit).
        `carries_input`: the unit hands the network's input on as the signal's `input` (for a method
        whose later units read it: InfoPro's reconstruction, ContSup's context).
        `head_answers`: the head's class scores are the model's answer (DeInfoReg's last block classifies;
        the model's own predictor is unused)."""
        super().__init__()
        self.name = name
        self.head_scope = head_scope or name
        self.body = body
        self.head = head
        self.predictor = predictor
        self.predictor_trains_body = predictor_trains_body
        self.carries_input = carries_input
        self.head_answers = head_answers

    def parameter_groups(self) -> list[dict[str, Any]]:
        """What the engine's updater optimizes: torch parameter groups, one per learning-rate scale. A
        submodule that has an `lr_scale` attribute learns at that multiple of the rate, its parameters
        and its children's (a child's own scale wins): AL's label path, a text model's word vectors."""
        scale: dict[int, float] = {}
        for module in self.modules():  # parents before children
            if getattr(module, "lr_scale", None) is not None:
                scale.update((id(p), float(module.lr_scale)) for p in module.parameters())
        groups: dict[float, list[nn.Parameter]] = {}
        for p in self.parameters():
            groups.setdefault(scale.get(id(p), 1.0), []).append(p)
        return [{"params": params, "lr_scale": s} for s, params in groups.items()]

    def epochs_trained(self, epochs: int) -> int:
        """How many of the run's `epochs` this unit trains in: its schedule spans them (a deep-cascade
        module trains in its own stage only)."""
        return epochs

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called on every unit before each training epoch (1-based, of `epochs`). A method whose units
        take turns (deep cascade learning) switches them here; the others need nothing."""

    # -- training (the engine's updater calls these) ---------------------------------------------

    def forward_train(self, signal: Signal) -> UnitStep:
        """The body's forward, keeping the graph for the losses."""
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
            terms = getattr(self.head, "terms", None)
            if terms is None:
                losses[self.head_loss_name] = self.head(out, labels)
            else:
                losses.update((f"{self.head_scope}/{name}", loss) for name, loss in terms(out, labels).items())
        if self.predictor is not None:
            # From a detached copy, unless the predictor is this unit's local head: then its gradient
            # reaches this unit's blocks (never an earlier unit's: inputs arrive detached).
            losses["predictor/ce"] = F.cross_entropy(self.predictor(out if self.predictor_trains_body else out.detach()), labels)
        return losses

    def network(self) -> Network | None:
        """This unit as one network to cut into stages, if it is one (None: a decoupled method's unit)."""
        return None

    @property
    def head_loss_name(self) -> str:
        return f"{self.head_scope}/{self.head.loss_name}"

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
            if self.head_answers:
                out[SCORES] = readout
        if self.predictor is not None:
            out[SCORES] = self.predictor(features)
        return out


def inference_route(units: list[LocalUnit]) -> list[tuple[int, str]]:
    """(unit index, phase) in the order inference visits them: every unit forward, then the units
    with a `back` phase from last to first. Every engine runs this same route."""
    forward = [(i, "forward") for i in range(len(units))]
    back = [(i, "back") for i in reversed(range(len(units))) if "back" in units[i].phases]
    return forward + back
