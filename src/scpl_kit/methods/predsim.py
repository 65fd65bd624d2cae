"""PredSim, local error signals (Nøkland & Eidnes, ICML 2019; code github.com/anokland/local-loss).

Every module learns from its own two-part loss on its output h, and hands h on detached:

    (1 − β) · CE(Linear(pool(h)), y)  +  β · MSE(S(conv3×3(h)), S(onehot(y)))

- the *prediction* loss: a linear classifier (weights zero at the start) on h average-pooled until
  it has at most `dim_in_decoder` features (the authors' rule, `decoder_pool`);
- the *similarity-matching* loss: S is `losses.similarity_matrix`, the batch's pairwise similarity;
  on the feature side it is taken of a learned 3×3 conv of h (no bias; a bias-free Linear for vector
  features), each channel summarised by its standard deviation over space (a map of more than 3
  channels and side > 1); on the label side of the one-hot labels (1 same class, −1/(C − 1) else).

β = 0.99 (the authors' default). The model's predictor (their output layer) learns from a detached
copy of the last module's output, as SCPL's does, so the last module too learns from its PredSim loss.
Its classifier's scores are each module's exit. What differs from the authors' runs: docs/deviations.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.heads import WeightedTermsHead
from scpl_kit.methods.losses import similarity_matching_loss
from scpl_kit.methods.units import LocalUnit
from scpl_kit.models.base import BlockModel


def decoder_pool(channels: int, side: int, dim_in_decoder: int) -> tuple[int, int]:
    """The pooled (height, width) the authors' prediction head sees: starting from side × side, halve
    the height, then the width, in turn (rounding up) while channels × height × width > `dim_in_decoder`
    and the kernel is smaller than the side (train.py, LocalLossBlockConv)."""
    kernel_h = kernel_w = 1
    height = width = side
    while channels * height * width > dim_in_decoder and kernel_h < side:
        kernel_h *= 2
        height = math.ceil(side / kernel_h)
        if channels * height * width > dim_in_decoder:
            kernel_w *= 2
            width = math.ceil(side / kernel_w)
    return height, width


def spatial_std(x: torch.Tensor) -> torch.Tensor:
    """A feature map [N, C, H, W] of more than 3 channels and side > 1 as each channel's standard deviation
    over space (unbiased, as torch's default), else flattened: what PredSim's similarity is taken of."""
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        return x.flatten(2).std(dim=2)
    return x.flatten(1)


class PredSimHead(WeightedTermsHead):
    loss_name = "predsim"

    def __init__(self, shape: tuple[int, ...], num_classes: int, beta: float = 0.99, dim_in_decoder: int = 2048) -> None:
        super().__init__()
        if not 0 <= beta <= 1:
            raise ValueError(f"predsim beta weighs the similarity loss against the prediction loss: it must be in [0, 1], got {beta}")
        self.num_classes, self.beta = num_classes, beta
        if len(shape) == 3:
            channels, side = shape[0], min(shape[1:])
            pooled = decoder_pool(channels, side, dim_in_decoder)
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(pooled)
            inputs = channels * pooled[0] * pooled[1]
            self.similarity_map: nn.Module = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        else:
            self.pool, inputs = nn.Identity(), int(torch.Size(shape).numel())
            self.similarity_map = nn.Linear(inputs, inputs, bias=False)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(inputs, num_classes))
        nn.init.zeros_(self.classifier[1].weight)  # the authors start every local classifier at zero weights

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(features))

    def terms(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(1 − β) · the prediction loss and β · the similarity-matching loss, each as weighted."""
        prediction = F.cross_entropy(self.readout(features), labels)
        similarity = similarity_matching_loss(spatial_std(self.similarity_map(features)), labels, self.num_classes)
        return {"pred": (1 - self.beta) * prediction, "sim": self.beta * similarity}


@METHODS.register("predsim")
def build_predsim(model: BlockModel, num_classes: int, beta: float = 0.99, dim_in_decoder: int = 2048) -> list[LocalUnit]:
    check_decouplable("predsim", model)
    last = len(model.blocks) - 1
    return [
        LocalUnit(f"block{k + 1}", block, head=PredSimHead(shape, num_classes, beta, dim_in_decoder), predictor=model.predictor if k == last else None)
        for k, (block, shape) in enumerate(zip(model.blocks, model.block_output_shapes()))
    ]
