"""The SCPL paper's VGG ("VGG8"): 4 blocks of 3×3 conv + BatchNorm + ReLU, a MaxPool ending each block.

Paper widths (methods.md §4): block1 [128, 256, M], block2 [256, 512, M], block3 [512, M],
block4 [512, M]; predictor Flatten → Linear(2048, 2500) → Sigmoid → Linear(2500, C).
`width` scales every conv (0.125 gives a model that trains in seconds on a CPU).
"""

from __future__ import annotations

from math import prod

import torch
from torch import nn

from scpl_kit.models.base import MODELS, BlockModel, check_image_input

PAPER_BLOCKS: list[list[int | str]] = [[128, 256, "M"], [256, 512, "M"], [512, "M"], [512, "M"]]


def conv_layers(in_channels: int, spec: list[int | str], batchnorm: bool = True) -> tuple[list[nn.Module], int]:
    """One layer per conv (3×3 conv + BatchNorm + ReLU), a MaxPool joining the conv before it: the
    places VGG8 can be cut (6 of them: one module per conv at K = 6)."""
    layers: list[list[nn.Module]] = []
    for item in spec:
        if item == "M":
            if layers:
                layers[-1].append(nn.MaxPool2d(2))
            else:
                layers.append([nn.MaxPool2d(2)])
        else:
            norm = nn.BatchNorm2d(int(item)) if batchnorm else nn.Identity()
            layers.append([nn.Conv2d(in_channels, int(item), 3, padding=1, bias=not batchnorm), norm, nn.ReLU(inplace=True)])
            in_channels = int(item)
    return [nn.Sequential(*layer) for layer in layers], in_channels


def check_input_fits(spec: list[list[int | str]], input_shape: tuple[int, ...]) -> None:
    """Each MaxPool2d(2) floors the side to half, so n of them leave ≥ 1 pixel only from 2**n up
    (the paper's 4 pools: 16×16; 28×28 MNIST ends at 1×1, 8×8 digits would end at 0×0)."""
    pools = sum(item == "M" for block in spec for item in block)
    fix = f'its {pools} max-pools each halve the side; drop some "M" from model.blocks, or use model=resnet18 (any size)'
    check_image_input("vgg", input_shape, 2**pools, fix)


@MODELS.register("vgg")
def vgg(
    input_shape: tuple[int, int, int],
    num_classes: int,
    width: float = 1.0,
    predictor_hidden: int = 2500,
    blocks: list[list[int | str]] | None = None,
    batchnorm: bool = True,
) -> BlockModel:
    """`batchnorm: false` gives a model whose gradient does not depend on how a batch is split
    (GPipe's micro-batches see their own BatchNorm statistics), for equivalence checks."""
    spec = blocks or PAPER_BLOCKS
    check_input_fits(spec, input_shape)
    channels = input_shape[0]
    built: list[list[nn.Module]] = []
    for block_spec in spec:
        scaled = [item if item == "M" else max(1, round(int(item) * width)) for item in block_spec]
        layers, channels = conv_layers(channels, scaled, batchnorm)
        built.append(layers)
    # The flattened size depends on the input's spatial size (28×28 MNIST vs 32×32 CIFAR). Probe in
    # eval mode so BatchNorm's running statistics stay untouched, then hand the blocks back in
    # training mode like any freshly built module.
    probe = nn.Sequential(*(layer for layers in built for layer in layers)).eval()
    with torch.no_grad():
        features = probe(torch.zeros(1, *input_shape))
    probe.train()
    predictor = nn.Sequential(
        nn.Flatten(),
        nn.Linear(prod(features.shape[1:]), predictor_hidden),
        nn.Sigmoid(),
        nn.Linear(predictor_hidden, num_classes),
    )
    return BlockModel(built, predictor, input_shape)
