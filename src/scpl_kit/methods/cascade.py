"""Deep cascade learning (Marquez, Hare & Niranjan, IEEE TNNLS 2018; methods.md §5).

The modules take turns: module 1 trains with a fresh output head for its share of the epochs
(`stage_epochs`: even, or growing as the authors' 10 + 10·i), is then frozen (no gradient,
BatchNorm statistics fixed), and module 2 trains on its outputs with a fresh head of its own, and so
on; the last module's head is the model's predictor. The turn is set by the epoch (`start_epoch`),
so a resumed run picks up where it stopped, and engines need to know nothing: a frozen unit only
runs forward, a waiting one hands its input on untouched. Each unit's learning-rate schedule spans
its own turn (`epochs_trained`): it starts afresh at every stage, as the authors reset the rate.

Inference reads the latest module that has trained: its head's scores are the model's, and every
trained module's head is an exit, so a run's history shows the accuracy after each stage (the
`val_acc` of the last epoch of each turn).

Engines: the stages are sequential by nature. Under `threads` and `pipeline` a run computes the same
weights as under `sequential`, but only the active module's worker computes gradients, so they add
no speed; `gpipe` (BP only) refuses it like any decoupled method.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Literal

import torch
from torch import nn

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.heads import ClassifierHead, spatial_classifier
from scpl_kit.methods.units import EXIT, SCORES, LocalUnit, UnitStep
from scpl_kit.models.base import BlockModel, run_block
from scpl_kit.signal import Signal

Role = Literal["waiting", "active", "frozen"]
STAGE_RULES = ("even", "growing")


def epochs_per_stage(epochs: int, modules: int, rule: str = "even") -> list[int]:
    """How many of the run's epochs each module trains, in order.

    even: shared out evenly, the earlier modules taking the remainder (module k trains in the epochs
    e where (e − 1)·K // epochs = k). growing: module i (0-based) gets a share proportional to i + 1,
    as the authors' Keras code trains stage i for 10 + 10·i epochs (K = 4: 10, 20, 30, 40 of 100),
    rounded by largest remainder so the shares add up to the run, and every module given at least one
    when there are enough (taken from the largest share). Fewer epochs than modules leave some with
    none, which a training run refuses (`CascadeUnit.start_epoch`)."""
    if rule not in STAGE_RULES:
        raise ValueError(f"method.stage_epochs={rule!r}; valid: {', '.join(STAGE_RULES)}")
    if rule == "even":
        return [sum(1 for e in range(epochs) if min(e * modules // epochs, modules - 1) == k) for k in range(modules)]
    weights = [i + 1 for i in range(modules)]
    exact = [epochs * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for k in sorted(range(modules), key=lambda k: counts[k] - exact[k])[: epochs - sum(counts)]:
        counts[k] += 1
    for k in range(modules if epochs >= modules else 0):
        if counts[k] == 0:
            counts[k], counts[counts.index(max(counts))] = 1, max(counts) - 1
    return counts


class CascadeUnit(LocalUnit):
    def __init__(self, name: str, body: torch.nn.Module, index: int, modules: int, head: ClassifierHead | None,
                 predictor: torch.nn.Module | None, stage_rule: str = "even") -> None:
        super().__init__(name, body, head=head, predictor=predictor, predictor_trains_body=True)
        self.index, self.module_count, self.stage_rule = index, modules, stage_rule
        self.role: Role = "active"  # until an epoch says otherwise (a bare training step trains every unit)
        # Saved with the weights: inference must know which modules have trained, wherever it runs.
        self.register_buffer("trained", torch.zeros((), dtype=torch.uint8))

    def epochs_trained(self, epochs: int) -> int:
        """Its own stage: the schedule decays over the module's turn."""
        return epochs_per_stage(epochs, self.module_count, self.stage_rule)[self.index]

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Module k (0-based) trains in the k-th run of epochs that `epochs_per_stage` gives it."""
        if epochs < self.module_count:  # a module without an epoch would hand the next one raw input
            raise ValueError(f"trainer.epochs={epochs} is fewer than deep cascade's {self.module_count} modules: each trains in epochs of its own")
        bounds = list(itertools.accumulate(epochs_per_stage(epochs, self.module_count, self.stage_rule)))
        turn = bisect.bisect_left(bounds, epoch)
        self.role = "frozen" if self.index < turn else "active" if self.index == turn else "waiting"

    @property
    def trains(self) -> bool:
        return self.role == "active"

    def train(self, mode: bool = True) -> "CascadeUnit":
        return super().train(mode and self.role != "frozen")  # a frozen module's BatchNorm keeps its statistics

    def forward_train(self, signal: Signal) -> UnitStep:
        if self.role == "active":
            self.trained.fill_(1)  # from now on inference reads this module's head
            return super().forward_train(signal)
        if self.role == "waiting":
            return UnitStep(signal, signal)  # nothing after the active module computes
        with torch.no_grad():
            return UnitStep(signal, run_block(self.body, signal))

    def local_losses(self, step: UnitStep) -> dict[str, torch.Tensor]:
        return super().local_losses(step) if self.role == "active" else {}

    def infer(self, signal: Signal, phase: str = "forward") -> Signal:
        if not self.trained:
            return signal  # not reached yet: the last trained module answers
        out = super().infer(signal, phase)
        if self.predictor is None:  # an earlier module's head: the latest trained one's scores win
            out[SCORES] = out[EXIT + self.name]
        return out


HEADS = ("pooled", "authors")


def authors_head(shape: tuple[int, ...], num_classes: int, width: int = 512) -> nn.Sequential:
    """The first author's Keras output head (github.com/EnriqueSMarquez/CascadeLearning, utils.py):
    Flatten → Dropout(0.5) → Dense(512) → ReLU → Dropout(0.5) → Dense(256) → ReLU → Dense(classes), no pooling."""
    return nn.Sequential(
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(int(torch.Size(shape).numel()), width), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(width, width // 2), nn.ReLU(inplace=True), nn.Linear(width // 2, num_classes),
    )


@METHODS.register("cascade")
def build_cascade(model: BlockModel, num_classes: int, head: str = "pooled", stage_epochs: str = "even", mlp_hidden: int | None = None,
                  mlp_layers: int = 1, side: int = 2) -> list[CascadeUnit]:
    """Output heads, `head`: pooled = average pooling to `side`×`side`, `mlp_layers` hidden Linear layers,
    a Linear to classes (DGL's head without its convs: cheap on a CPU); authors = the authors' head
    (`authors_head`). `stage_epochs`: how the run's epochs are shared out (`epochs_per_stage`)."""
    if head not in HEADS:
        raise ValueError(f"method.head={head!r}; valid: {', '.join(HEADS)}")
    check_decouplable("cascade", model)
    shapes, last = model.block_output_shapes(), len(model.blocks) - 1

    def output_head(shape: tuple[int, ...]) -> ClassifierHead:
        if head == "authors":
            return ClassifierHead(authors_head(shape, num_classes))
        return ClassifierHead(spatial_classifier(shape, num_classes, mlp_hidden, mlp_layers, conv_layers=0, side=side))

    return [
        CascadeUnit(f"block{k + 1}", block, k, len(model.blocks), head=None if k == last else output_head(shape),
                    predictor=model.predictor if k == last else None, stage_rule=stage_epochs)
        for k, (block, shape) in enumerate(zip(model.blocks, shapes))
    ]
