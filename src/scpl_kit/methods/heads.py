"""Local heads: small modules that turn a block's output into that block's loss."""

from __future__ import annotations

from torch import nn
import torch
import torch.nn.functional as F

from scpl_kit.methods.losses import VARIANTS, Variant, supcon_loss

PROJECTORS: tuple[str, ...] = ("i", "l", "m")


class GlobalAvgPool(nn.Module):
    """Average over every spatial dim; features that are already vectors pass through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2) if x.dim() > 2 else x


def build_projector(kind: str, in_shape: tuple[int, ...], pool: bool, hidden: int = 512, out: int = 1024) -> nn.Module:
    """SCPL's projector g_k. `m` = Flatten → Linear(in, 512) → ReLU → Linear(512, 1024) as in the paper;
    `pool` first averages the feature map over space, which makes `m` cost almost nothing (issue #3)."""
    if kind not in PROJECTORS:
        raise ValueError(f"unknown projector {kind!r}; valid projectors: {', '.join(PROJECTORS)}")
    layers: list[nn.Module] = [GlobalAvgPool() if pool else nn.Identity(), nn.Flatten()]
    in_features = in_shape[0] if pool else int(torch.Size(in_shape).numel())
    if kind == "l":
        layers.append(nn.Linear(in_features, out))
    elif kind == "m":
        layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)]
    return nn.Sequential(*layers)


class SupConHead(nn.Module):
    loss_name = "supcon"

    def __init__(self, projector: nn.Module, temperature: float, variant: Variant) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown SupCon variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
        if temperature <= 0:
            raise ValueError(f"SupCon temperature must be > 0, got {temperature}")
        self.projector = projector
        self.temperature = temperature
        self.variant = variant

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supcon_loss(self.projector(features), labels, self.temperature, self.variant)

    def readout(self, features: torch.Tensor) -> None:
        return None  # a projection, not class scores


class WeightedTermsHead(nn.Module):
    """A head whose loss is a sum of named, weighted terms (PredSim, DeInfoReg): a subclass gives `terms`,
    which the unit logs one by one (`LocalHead`); called, the head gives their sum."""

    def terms(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(self.terms(features, labels).values())


class CrossEntropyHead(nn.Module):
    """Cross-entropy on features that already are class scores (BP's loss at the end of the network)."""

    loss_name = "ce"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def readout(self, logits: torch.Tensor) -> None:
        return None  # the unit's output already is the model's answer


class ClassifierHead(nn.Module):
    """A block's own classifier, trained with cross-entropy (Early Exit); its scores are the block's exit."""

    loss_name = "ce"

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(features), labels)

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


def spatial_classifier(in_shape: tuple[int, ...], num_classes: int, hidden: int | None = None, mlp_layers: int = 3,
                       conv_layers: int = 3, side: int = 2) -> nn.Sequential:
    """DGL's auxiliary classifier ('mlp-sr' in the authors' CIFAR code, github.com/eugenium/DGL): average
    pooling to a quarter of the side (rounded up), `conv_layers` 1×1 convs (+ BN + ReLU) at the map's
    width, average pooling to `side`×`side`, `mlp_layers` Linear layers (+ BN + ReLU) at the pooled width
    (or `hidden`), then a Linear to class scores. Vector features (a pooled or text summary) go
    straight to the MLP."""
    layers: list[nn.Module] = []
    channels = in_shape[0]
    if len(in_shape) == 3:
        height, width_px = in_shape[1:]
        if conv_layers:
            height, width_px = -(-height // 4), -(-width_px // 4)  # a quarter of the side, rounded up: cheaper 1×1 convs
            layers.append(nn.AdaptiveAvgPool2d((height, width_px)))
            for _ in range(conv_layers):
                layers += [nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        pooled = min(side, height), min(side, width_px)  # a map already smaller stays as it is
        layers.append(nn.AdaptiveAvgPool2d(pooled))
        width = channels * pooled[0] * pooled[1]
    else:
        width = int(torch.Size(in_shape).numel())
    layers.append(nn.Flatten())
    hidden = hidden or width
    for _ in range(mlp_layers):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
