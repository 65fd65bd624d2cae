"""InfoPro, information propagation (Wang et al., ICLR 2021; methods.md §5).

Greedy local learning whose local loss also asks each module to keep what it was given: module k
(all but the last) learns from

    λ₁ₖ · BCE(sigmoid(decoder(hₖ)), pixels(x))  +  λ₂ₖ · (cross-entropy of a classifier | SupCon of a projection)(hₖ)

where the decoder reconstructs the network's input x from the module's output (so x travels with
the activations, as the signal's `input`), in [0, 1] pixels: x·std + mean, the data's normalisation
undone (the model carries it: `BlockModel.set_input_statistics`). The last module learns from the network's own classifier
(the model's predictor), as in the authors' code. λ moves linearly over the modules from
(recon_weight[0], head_weight[0]) at module 1 to (recon_weight[1], head_weight[1]) at module K−1:
early modules mostly keep information, later ones mostly separate classes.

Facts from the authors' code (github.com/blackfeather-wang/InfoPro-Pytorch, CIFAR experiments):
the decoder upsamples the feature bilinearly to the image's side, then conv3×3 → 12 (bias) → BN →
ReLU → conv3×3 → image channels (bias); the auxiliary net '1c2f' is a conv3×3 (doubling the channels
at stride 2 on maps wider than 8, else keeping them at stride 1; no bias) → BN → ReLU → global
average pooling → Linear(·, 128) → ReLU → Linear(128, classes, or 128 for SupCon at τ 0.07);
λ moves as i / (K − 2) over the local modules; the decoder ends in a sigmoid and its loss is the
mean binary cross-entropy against the image in [0, 1] (here the sigmoid is folded into the loss,
`binary_cross_entropy_with_logits`: the same function, and safe under bf16 autocast). λ₁, λ₂ are set
per model and K in the authors' command script: `lambdas: resnet32 | resnet110` takes that table
(LAMBDAS) at the run's K. Their even cut points equal `BlockModel.recut`'s for ResNet-32 at every K;
for ResNet-110 at K = 2 and 3 only (at K = 4 and 8 theirs start each module one layer earlier, at
K = 16 up to 7 layers apart: docs/deviations.md). Their memory-balanced cuts (InfoPro*) are
`method.cuts: balanced` (ResNet-110, K = 2, 3, 4).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.heads import ClassifierHead, SupConHead
from scpl_kit.methods.units import LocalUnit, UnitStep
from scpl_kit.models.base import BlockModel
from scpl_kit.signal import network_input, summary

LOSSES = ("ce", "contrast")
# The authors' (λ₁, λ₂ at module 1; λ₁, λ₂ at module K−1) per model and K: CIFAR-10, contrast,
# InfoPro-Pytorch's comand.sh (lines 7-10 ResNet-32, 15-18 ResNet-110). As (recon_weight, head_weight).
LAMBDAS: dict[str, dict[int, tuple[tuple[float, float], tuple[float, float]]]] = {
    "resnet32": {2: ((5, 0), (1, 0)), 4: ((6, 1), (0, 2)), 8: ((5, 0), (0, 2)), 16: ((5, 0.2), (0.05, 0.5))},
    "resnet110": {2: ((5, 0), (0.5, 0)), 4: ((1, 0), (0, 1)), 8: ((5, 0), (0, 1)), 16: ((5, 0.5), (0, 1))},
}


def paper_lambdas(model_name: str, k: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(recon_weight, head_weight) pairs of the authors' table for `model_name` at K = `k`."""
    if model_name not in LAMBDAS or k not in LAMBDAS[model_name]:
        have = "; ".join(f"{m}: K = {', '.join(map(str, ks))}" for m, ks in LAMBDAS.items())
        raise ValueError(f"method.lambdas={model_name!r} at K = {k}: the authors' table has {have}; give recon_weight and head_weight instead (lambdas: null)")
    return LAMBDAS[model_name][k]


def pixels(x: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """The network's input back in [0, 1] pixels (the data's normalisation undone)."""
    return x if mean is None else x * std.to(x.device) + mean.to(x.device)


def require_images(method: str, shapes: list[tuple[int, ...]], input_shape: tuple[int, ...]) -> None:
    """Decoders and context encoders are convolutions over feature maps of an image model."""
    if len(input_shape) != 3 or any(len(shape) != 3 for shape in shapes):
        raise ValueError(f"method {method} needs an image model whose cut points are feature maps (channels, height, width); "
                         f"got input {tuple(input_shape)} and module outputs {shapes}. Use method=dgl or early_exit for this model")


class Decoder(nn.Module):
    """Upsample the feature map to the input's side (bilinear), then conv3×3 → BN → ReLU → conv3×3 back
    to the input's channels: InfoPro's decoder, its final sigmoid left to the loss (logits out)."""

    def __init__(self, in_channels: int, image_shape: tuple[int, int, int], hidden: int = 12) -> None:
        super().__init__()
        self.size = tuple(image_shape[1:])
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, image_shape[0], 3, padding=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if tuple(features.shape[2:]) != self.size:
            features = F.interpolate(features, size=self.size, mode="bilinear", align_corners=True)
        return self.net(features)


def aux_classifier(shape: tuple[int, ...], out_dim: int, hidden: int) -> nn.Sequential:
    """InfoPro's auxiliary net ('1c2f'): conv3×3 → BN → ReLU → global average pool → Linear(·, hidden) →
    ReLU → Linear(hidden, out_dim). The conv doubles the channels at stride 2 on maps wider than 8
    (InfoPro's 16- and 32-channel stages) and keeps them at stride 1 on the rest (its 64-channel 8×8 stage)."""
    channels, side = shape[0], shape[-1]
    out, stride = (2 * channels, 2) if side > 8 else (channels, 1)
    return nn.Sequential(
        nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim),
    )


def reconstruction_loss(decoder: Decoder, features: torch.Tensor, x: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """InfoPro's: mean BCE between the decoder's sigmoid and the input in [0, 1] pixels."""
    return F.binary_cross_entropy_with_logits(decoder(features).float(), pixels(x, mean, std).float())


def with_reconstruction(unit: str, head_losses: dict[str, torch.Tensor], step: UnitStep, decoder: Decoder, weights: tuple[float, float],
                        statistics: tuple[torch.Tensor | None, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """λ₂ · the head's losses + λ₁ · the reconstruction of the network's input from `unit`'s output
    (`weights` = (λ₁, λ₂); `statistics`: the data's mean and std). Each term is logged as weighted:
    their sum is what the module descends. InfoPro's local loss, and ContSup's with reconstruction."""
    recon_weight, head_weight = weights
    losses = {name: head_weight * loss for name, loss in head_losses.items()}
    reconstruction = reconstruction_loss(decoder, summary(step.outputs), network_input(step.inputs), *statistics)
    losses[f"{unit}/reconstruction"] = recon_weight * reconstruction
    return losses


class InfoProUnit(LocalUnit):
    def __init__(self, name: str, body: nn.Module, head: nn.Module, decoder: Decoder, recon_weight: float, head_weight: float,
                 input_mean: torch.Tensor | None = None, input_std: torch.Tensor | None = None) -> None:
        super().__init__(name, body, head=head, carries_input=True)
        self.decoder, self.recon_weight, self.head_weight = decoder, recon_weight, head_weight
        self.input_mean, self.input_std = input_mean, input_std

    def local_losses(self, step: UnitStep) -> dict[str, torch.Tensor]:
        weights, statistics = (self.recon_weight, self.head_weight), (self.input_mean, self.input_std)
        return with_reconstruction(self.name, super().local_losses(step), step, self.decoder, weights, statistics)


def interpolated(pair: tuple[float, float] | list[float], k: int, count: int) -> float:
    """Linear from pair[0] at the first local module to pair[1] at the last one."""
    share = k / (count - 1) if count > 1 else 0.0
    return float(pair[0] + (pair[1] - pair[0]) * share)


@METHODS.register("infopro")
def build_infopro(model: BlockModel, num_classes: int, loss: Literal["ce", "contrast"] = "contrast", recon_weight: list[float] = (5.0, 0.0),
                  head_weight: list[float] = (1.0, 1.0), lambdas: str | None = None, hidden: int = 128, decoder_width: int = 12,
                  temperature: float = 0.07) -> list[LocalUnit]:
    """`lambdas`: a model of the authors' λ table (resnet32, resnet110), which then sets recon_weight
    and head_weight for the run's K."""
    if loss not in LOSSES:
        raise ValueError(f"unknown infopro loss {loss!r}; valid losses: {', '.join(LOSSES)}")
    check_decouplable("infopro", model)
    if lambdas is not None:
        recon_weight, head_weight = paper_lambdas(lambdas, len(model.blocks))
    shapes, local = model.block_output_shapes(), len(model.blocks) - 1
    require_images("infopro", shapes[:-1], model.input_shape)
    units: list[LocalUnit] = []
    for k, (block, shape) in enumerate(zip(model.blocks[:-1], shapes)):
        if loss == "ce":
            head = ClassifierHead(aux_classifier(shape, num_classes, hidden))
        else:
            head = SupConHead(aux_classifier(shape, hidden, hidden), temperature, "standard")
        units.append(InfoProUnit(f"block{k + 1}", block, head, Decoder(shape[0], model.input_shape, decoder_width),
                                 interpolated(recon_weight, k, local), interpolated(head_weight, k, local), model.input_mean, model.input_std))
    units.append(LocalUnit(f"block{local + 1}", model.blocks[-1], predictor=model.predictor, predictor_trains_body=True))
    return units
