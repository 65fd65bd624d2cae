"""ContSup, context supply (Yu et al., IEEE TAI 2025; methods.md §5).

Greedy local learning that gives each module back some of what greedy training throws away: at
every boundary the detached feature h entering module k+1 is augmented with detached context,

    h' = h + Σ_c M_c(c),   c ∈ {E: the network's input x, R1: the previous boundary's h'}

and module k+1 runs on h'. Modes: R0 (no context: plain greedy learning with ContSup's heads), E,
R1, R1E (both). The context encoders M belong to the module they feed, so its local loss trains them
(and the network's classifier trains the last one's), and they run at inference too. x and the
previous h' travel with the activations (the signal's `input` and `contsup/previous`), so the
pipelined engines carry them like any feature. Local heads: InfoPro's auxiliary net with
cross-entropy, or its 128-d projection with SupCon (τ 0.07); the last module learns from the
network's own classifier (the model's predictor).

Facts from the authors' code (github.com/Tab-ct/ContSup, built on InfoPro's): the E encoder is
conv3×3 → 12 → BN → ReLU → conv3×3 → C → BN → ReLU at the input's side, then average pooling to the
boundary's side; the R encoder conv1×1 → C → BN → ReLU, then the same pooling (convs with bias). At
the first boundary R1 encodes the input itself, and R1E uses E alone there. `reconstruct: true` is
their `h_reconstruct` option, with which every ResNet-110 result of theirs was trained: each local
module also reconstructs the input in [0, 1] pixels from its output (before the next context is
added) with InfoPro's decoder and loss, λ₁·BCE + λ₂·head, λ from InfoPro's table (`lambdas`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.heads import ClassifierHead, SupConHead
from scpl_kit.methods.infopro import Decoder, aux_classifier, interpolated, paper_lambdas, require_images, with_reconstruction
from scpl_kit.methods.units import LocalUnit, UnitStep
from scpl_kit.models.base import BlockModel
from scpl_kit.signal import FEATURES, Signal, network_input

MODES: dict[str, tuple[str, ...]] = {"R0": (), "E": ("E",), "R1": ("R1",), "R1E": ("R1", "E")}
PREVIOUS = "contsup/previous"  # the feature that entered the unit before: R1's context for the next one


E_WIDTH = 12  # the E encoder's hidden channels


def context_encoder(kind: str, context_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> nn.Sequential:
    """Maps a context to the boundary feature's shape: convs at the context's own side (E: two 3×3,
    through 12 channels; R1: one 1×1), each + BN + ReLU, then average pooling to the boundary's side."""
    channels = target_shape[0]
    if kind == "E":
        convs = [nn.Conv2d(context_shape[0], E_WIDTH, 3, padding=1), nn.BatchNorm2d(E_WIDTH), nn.ReLU(inplace=True),
                 nn.Conv2d(E_WIDTH, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
    else:
        convs = [nn.Conv2d(context_shape[0], channels, 1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*convs, nn.AdaptiveAvgPool2d(tuple(target_shape[1:])))


class ContextUnit(LocalUnit):
    def __init__(self, name: str, body: nn.Module, encoders: dict[str, nn.Module], head: nn.Module | None = None,
                 predictor: nn.Module | None = None, decoder: Decoder | None = None, weights: tuple[float, float] = (0.0, 1.0),
                 input_statistics: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> None:
        """`decoder`: reconstruct the input from this module's output, the losses then weighted
        `weights` = (λ₁ reconstruction, λ₂ head); `input_statistics`: the data's (mean, std)."""
        super().__init__(name, body, head=head, predictor=predictor, predictor_trains_body=predictor is not None, carries_input=True)
        self.encoders = nn.ModuleDict(encoders)
        self.decoder, self.weights, self.input_statistics = decoder, weights, input_statistics

    def local_losses(self, step: UnitStep) -> dict[str, torch.Tensor]:
        losses = super().local_losses(step)
        if self.decoder is None:
            return losses
        return with_reconstruction(self.name, losses, step, self.decoder, self.weights, self.input_statistics)

    def supplied(self, signal: Signal) -> Signal:
        """h' = h + Σ M(c); the contexts arrive detached, like h."""
        contexts = {"E": network_input(signal), "R1": signal[PREVIOUS]}
        features = signal[FEATURES]
        for kind, encoder in self.encoders.items():
            features = features + encoder(contexts[kind])
        return {**signal, FEATURES: features}

    def run_body(self, signal: Signal) -> Signal:
        supplied = self.supplied(signal) if self.encoders else signal
        # The next boundary's R1 context is this one's h', detached like everything handed on.
        return {**super().run_body(supplied), PREVIOUS: supplied[FEATURES]}


@METHODS.register("contsup")
def build_contsup(model: BlockModel, num_classes: int, context: Literal["R0", "E", "R1", "R1E"] = "R1E",
                  loss: Literal["ce", "supcon"] = "ce", hidden: int = 128, temperature: float = 0.07, reconstruct: bool = False,
                  lambdas: str | None = None, recon_weight: list[float] = (5.0, 0.0), head_weight: list[float] = (1.0, 1.0)) -> list[LocalUnit]:
    """`reconstruct`: the authors' h_reconstruct (InfoPro's decoder on every local module), weighted by
    recon_weight / head_weight from module 1 to module K−1, or by InfoPro's table (`lambdas`)."""
    if context not in MODES:
        raise ValueError(f"unknown contsup context {context!r}; valid modes: {', '.join(MODES)}")
    if loss not in ("ce", "supcon"):
        raise ValueError(f"unknown contsup loss {loss!r}; valid losses: ce, supcon")
    check_decouplable("contsup", model)
    shapes, last = model.block_output_shapes(), len(model.blocks) - 1
    if MODES[context] or reconstruct:
        require_images("contsup", shapes[:-1], model.input_shape)
    if reconstruct and lambdas is not None:  # λ weigh the reconstruction against the head: nothing to weigh without it
        recon_weight, head_weight = paper_lambdas(lambdas, len(model.blocks))
    inputs = [tuple(model.input_shape), *shapes]  # what enters unit k, and (k − 1) the one before
    units: list[LocalUnit] = []
    for k, (block, shape) in enumerate(zip(model.blocks, shapes)):
        kinds = ("E",) if k == 1 and context == "R1E" else MODES[context] if k else ()  # at the first boundary R1's context is x: E covers it
        encoders = {kind: context_encoder(kind, inputs[0] if kind == "E" else inputs[k - 1], inputs[k]) for kind in kinds}
        if k == last:
            units.append(ContextUnit(f"block{k + 1}", block, encoders, predictor=model.predictor))
            continue
        classifier = aux_classifier(shape, num_classes if loss == "ce" else hidden, hidden) if len(shape) == 3 else nn.Linear(shape[0], num_classes)
        head = ClassifierHead(classifier) if loss == "ce" else SupConHead(classifier, temperature, "standard")
        decoder = Decoder(shape[0], model.input_shape) if reconstruct else None
        weights = (interpolated(recon_weight, k, last), interpolated(head_weight, k, last))
        units.append(ContextUnit(f"block{k + 1}", block, encoders, head, None, decoder, weights, (model.input_mean, model.input_std)))
    return units
