"""Deep cascade learning (Marquez, Hare & Niranjan, IEEE TNNLS 2018; methods.md §5).

The modules take turns: module 1 trains with a fresh output head for the first 1/K of the epochs,
is then frozen (no gradient, BatchNorm statistics fixed), and module 2 trains on its outputs with a
fresh head of its own, and so on; the last module's head is the model's predictor. The turn is set
by the epoch (`start_epoch`), so a resumed run picks up where it stopped, and engines need to know
nothing: a frozen unit only runs forward, a waiting one hands its input on untouched. Each unit's
learning-rate schedule decays over its own turn.

Inference reads the latest module that has trained: its head's scores are the model's, and every
trained module's head is an exit, so a run's history shows the accuracy after each stage (the
`val_acc` of the last epoch of each turn).

Engines: the stages are sequential by nature. Under `threads` and `pipeline` a run computes the same
weights as under `sequential`, but only the active module's worker computes gradients, so they add
no speed; `gpipe` (BP only) refuses it like any decoupled method.
"""

from __future__ import annotations

from typing import Literal

import torch

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.heads import ClassifierHead, spatial_classifier
from scpl_kit.methods.units import EXIT, SCORES, LocalUnit, OptimizerFactory, UnitStep
from scpl_kit.models.base import BlockModel, run_block
from scpl_kit.signal import Signal

Role = Literal["waiting", "active", "frozen"]


class CascadeUnit(LocalUnit):
    def __init__(self, name: str, body: torch.nn.Module, index: int, modules: int, head: ClassifierHead | None,
                 predictor: torch.nn.Module | None) -> None:
        super().__init__(name, body, head=head, predictor=predictor, predictor_trains_body=True)
        self.index, self.module_count = index, modules
        self.role: Role = "active"  # until an epoch says otherwise (a bare train_step trains every unit)
        # Saved with the weights: inference must know which modules have trained, wherever it runs.
        self.register_buffer("trained", torch.zeros((), dtype=torch.uint8))

    def configure_optimizer(self, make: OptimizerFactory) -> None:
        self.optimizer, self.scheduler = make(self.parameters(), share=1 / self.module_count)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Epochs are shared out evenly: module k (0-based) trains in epochs where (epoch−1)·K // epochs = k."""
        turn = min((epoch - 1) * self.module_count // epochs, self.module_count - 1)
        self.role = "frozen" if self.index < turn else "active" if self.index == turn else "waiting"

    @property
    def trains(self) -> bool:
        return self.role == "active"

    def train(self, mode: bool = True) -> "CascadeUnit":
        return super().train(mode and self.role != "frozen")  # a frozen module's BatchNorm keeps its statistics

    def forward_train(self, signal: Signal) -> UnitStep:
        if self.role == "active":
            return super().forward_train(signal)
        if self.role == "waiting":
            return UnitStep(signal, signal)  # nothing after the active module computes
        with torch.no_grad():
            return UnitStep(signal, run_block(self.body, signal))

    def learn(self, step: UnitStep) -> dict[str, torch.Tensor]:
        if self.role != "active":
            return {}
        self.trained.fill_(1)
        return super().learn(step)

    def infer(self, signal: Signal, phase: str = "forward") -> Signal:
        if not self.trained:
            return signal  # not reached yet: the last trained module answers
        out = super().infer(signal, phase)
        if self.predictor is None:  # an earlier module's head: the latest trained one's scores win
            out[SCORES] = out[EXIT + self.name]
        return out


@METHODS.register("cascade")
def build_cascade(model: BlockModel, num_classes: int, mlp_hidden: int | None = None, mlp_layers: int = 1, side: int = 2) -> list[CascadeUnit]:
    """Output heads: average pooling to `side`×`side`, `mlp_layers` hidden Linear layers, a Linear to
    classes (DGL's head without its convs; the TNNLS paper's own head could not be checked: no code
    of the authors' is public)."""
    check_decouplable("cascade", model)
    shapes, last = model.block_output_shapes(), len(model.blocks) - 1
    return [
        CascadeUnit(
            f"block{k + 1}", block, k, len(model.blocks),
            head=None if k == last else ClassifierHead(spatial_classifier(shape, num_classes, mlp_hidden, mlp_layers, conv_layers=0, side=side)),
            predictor=model.predictor if k == last else None,
        )
        for k, (block, shape) in enumerate(zip(model.blocks, shapes))
    ]
