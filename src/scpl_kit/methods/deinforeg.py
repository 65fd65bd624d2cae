"""DeInfoReg, decoupled supervised learning with information regularisation (Huang, Lin & Chen,
Neurocomputing 2025; code github.com/ianzih/Decoupled-Supervised-Learning-for-Information-Regularization),
the SCPL authors' group's successor to SCPL.

Every block learns from its own loss on a projection z of its output and hands its output on detached:

    variance(z) + invariance(z, y) + covariance(z)  +  0.001 · CE(classifier(z), y)

(`losses.information_regularizer`: VICReg's three terms, with the invariance term matching the batch's
similarity matrix of z to that of the one-hot labels, not two augmented views). The projector is
Flatten → (Linear → BatchNorm → ReLU) × 2 → Linear at `projector_dim` (2048 in the authors' vision code);
on text the block's summary vector is z itself (`projector: i`, their NLP code). The classifier reads z:
BatchNorm → ReLU → Linear on a projection, Tanh → Linear on a text summary, as theirs. Its small weight
lets its gradient reach the block (z is not detached).

Every block's classifier is an exit; the last block's is the model's answer (the model's own predictor
is unused). The authors report the best block at the best epoch, both chosen on the test set; the kit
reports the last block, and every exit beside it (the per-exit table). What else differs: docs/deviations.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.heads import WeightedTermsHead
from scpl_kit.methods.losses import information_regularizer
from scpl_kit.methods.units import LocalUnit
from scpl_kit.models.base import BlockModel

PROJECTORS = ("m", "i")
CE_WEIGHT = 0.001  # the authors' weight of each block's classifier loss beside the regulariser's (theirs: every model)


def make_projector(kind: str, in_shape: tuple[int, ...], width: int) -> tuple[nn.Module, int]:
    """`m`: the authors' vision projector, Flatten → (Linear → BN → ReLU) × 2 → Linear, all `width` wide;
    `i`: the features themselves (their text models). Returns it and its output width."""
    if kind not in PROJECTORS:
        raise ValueError(f"unknown deinforeg projector {kind!r}; valid projectors: {', '.join(PROJECTORS)}")
    features = int(torch.Size(in_shape).numel())
    if kind == "i":
        return nn.Flatten(), features
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(2):
        layers += [nn.Linear(features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        features = width
    return nn.Sequential(*layers, nn.Linear(width, width)), width


class DeInfoRegHead(WeightedTermsHead):
    loss_name = "deinforeg"

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, kind: str = "m", width: int = 2048) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.projector, dim = make_projector(kind, in_shape, width)
        # BN → ReLU on a projection, Tanh on a text summary: the authors' vision and NLP classifiers.
        activation = [nn.BatchNorm1d(dim), nn.ReLU()] if kind == "m" else [nn.Tanh()]
        self.classifier = nn.Sequential(*activation, nn.Linear(dim, num_classes))

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.projector(features))

    def terms(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.projector(features)
        terms = information_regularizer(z, labels, self.num_classes)
        terms["ce"] = CE_WEIGHT * F.cross_entropy(self.classifier(z), labels)
        return terms


@METHODS.register("deinforeg")
def build_deinforeg(model: BlockModel, num_classes: int, projector: str = "m", projector_dim: int = 2048) -> list[LocalUnit]:
    check_decouplable("deinforeg", model)
    last = len(model.blocks) - 1
    return [
        LocalUnit(f"block{k + 1}", block, head=DeInfoRegHead(shape, num_classes, projector, projector_dim), head_answers=k == last)
        for k, (block, shape) in enumerate(zip(model.blocks, model.block_output_shapes()))
    ]
