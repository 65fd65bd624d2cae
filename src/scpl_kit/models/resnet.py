"""ResNets: the SCPL paper's ResNet-18, and the CIFAR ResNet-32 / ResNet-110 of the InfoPro and ContSup papers.

A ResNet's layers (its cut points) are its BasicBlocks and its stem: ResNet-18's stem joins its first
BasicBlock (the paper's block 1 starts with it), so it has 8 layers (K ∈ {2, 4, 8}); the CIFAR ResNets'
stem is a layer of its own, so ResNet-32 has 16 and ResNet-110 55 (K ∈ {2, 4, 8, 16}).

ResNet-18 as the SCPL paper splits it into 4 blocks (methods.md §4): block 1 = stem (3×3 conv → 64)
+ two BasicBlocks 64→64; blocks 2-4 = two BasicBlocks each, 64→128, 128→256, 256→512, the first of
each with stride 2; block 4 ends with global average pooling, so it hands the predictor
Linear(512, C) a vector. Two departures from the usual CIFAR ResNet-18, both as methods.md §4 records
the paper's model: LeakyReLU instead of ReLU, and a strided shortcut that is a 3×3 conv (not 1×1),
which adds about 1.4M parameters to the usual 11.2M.

ResNet-32 / ResNet-110 (He et al. 2016, as the InfoPro code builds them): stem 3×3 conv → 16 + BN +
ReLU, three stages of n = (depth − 2) / 6 BasicBlocks at 16, 32, 64 channels (strides 1, 2, 2), ReLU,
a 1×1 conv + BN shortcut where the shape changes, global average pooling, Linear(64, C). Their
default blocks are the 16 (55) layers cut evenly into 4.
`width` scales every channel count (0.125 gives ResNet-18 8, 16, 32, 64 channels).
"""

from __future__ import annotations

from torch import nn, Tensor

from scpl_kit.models.base import MODELS, BlockModel, check_image_input, even_cuts

STEM_CHANNELS = 64
# (output channels, stride of the stage's first BasicBlock): each later stage halves the side.
PAPER_STAGES: list[tuple[int, int]] = [(64, 1), (128, 2), (256, 2), (512, 2)]


def conv3x3(in_channels: int, out_channels: int, stride: int, batchnorm: bool) -> nn.Conv2d:
    # Padding 1 keeps the side (or halves it, rounding up, at stride 2), so any input ≥ 1×1 fits.
    # No bias when BatchNorm follows: its shift would cancel a bias anyway.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not batchnorm)


def norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


def activation(leaky: bool = True) -> nn.Module:
    # LeakyReLU: PyTorch's default slope 0.01, which the SCPL authors' code keeps (ResNet-18); the CIFAR
    # ResNets use ReLU. In place saves one activation-sized tensor per layer, as VGG's ReLU does.
    return nn.LeakyReLU(inplace=True) if leaky else nn.ReLU(inplace=True)


class BasicBlock(nn.Module):
    """conv3×3(stride) + BN + activation, conv3×3 + BN, add the shortcut, activation. Where the shape
    changes the shortcut is a conv (3×3 in the SCPL paper's ResNet-18, 1×1 in the CIFAR ResNets) + BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, batchnorm: bool = True, leaky: bool = True,
                 shortcut_kernel: int = 3) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride, batchnorm)
        self.bn1 = norm(out_channels, batchnorm)
        self.act1 = activation(leaky)
        self.conv2 = conv3x3(out_channels, out_channels, 1, batchnorm)
        self.bn2 = norm(out_channels, batchnorm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:  # the sum needs the residual's shape
            conv = nn.Conv2d(in_channels, out_channels, shortcut_kernel, stride=stride, padding=shortcut_kernel // 2, bias=not batchnorm)
            self.shortcut = nn.Sequential(conv, norm(out_channels, batchnorm))
        self.act2 = activation(leaky)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


def resnet(input_shape: tuple[int, int, int], num_classes: int, name: str, stem_channels: int, stages: list[tuple[int, int]],
           blocks_per_stage: int, width: float, batchnorm: bool, leaky: bool, shortcut_kernel: int, stem_alone: bool, blocks: int = 4) -> BlockModel:
    """The layers (the stem, alone or with the first BasicBlock, then one BasicBlock each, the pooling joining the last)
    cut evenly into `blocks` blocks. Built in training mode with BatchNorm untouched:
    global pooling makes the predictor's input the last stage's channel count whatever the side."""
    check_image_input(name, input_shape, 1, "the dataset's images have no pixels")

    def scale(channels: int) -> int:
        return max(1, round(channels * width))

    channels = scale(stem_channels)
    # Built in the order the layers run, so a seed gives the same weights as before the cut points existed.
    stem = [conv3x3(input_shape[0], channels, 1, batchnorm), norm(channels, batchnorm), activation(leaky)]
    layers: list[nn.Module] = []
    for out_channels, stride in stages:
        for i in range(blocks_per_stage):
            layers.append(BasicBlock(channels, scale(out_channels), stride if i == 0 else 1, batchnorm, leaky, shortcut_kernel))
            channels = scale(out_channels)
    if stem_alone:  # a cut point of its own (ResNet-32: 16 layers, so K = 16 gives one module per layer)
        layers.insert(0, nn.Sequential(*stem))
    else:
        layers[0] = nn.Sequential(*stem, layers[0])
    layers[-1] = nn.Sequential(layers[-1], nn.AdaptiveAvgPool2d(1), nn.Flatten())  # the last block hands over a vector
    bounds = [0, *even_cuts(len(layers), blocks), len(layers)]
    return BlockModel([layers[a:b] for a, b in zip(bounds, bounds[1:])], nn.Linear(channels, num_classes), input_shape)


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0, batchnorm: bool = True) -> BlockModel:
    """The SCPL paper's: 4 blocks of two BasicBlocks."""
    return resnet(input_shape, num_classes, "resnet18", STEM_CHANNELS, PAPER_STAGES, 2, width, batchnorm, leaky=True, shortcut_kernel=3, stem_alone=False)


def cifar_resnet(name: str, depth: int) -> None:
    n = (depth - 2) // 6

    @MODELS.register(name)
    def build(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0, batchnorm: bool = True) -> BlockModel:
        model = resnet(input_shape, num_classes, name, CIFAR_STEM, CIFAR_STAGES, n, width, batchnorm, leaky=False, shortcut_kernel=1, stem_alone=True)
        model.balanced_cuts = dict(BALANCED_CUTS.get(name, {}))
        return model

    build.__doc__ = f"CIFAR ResNet-{depth}: {3 * n} BasicBlocks in three stages, 4 blocks by default."


CIFAR_STEM = 16
# InfoPro*'s memory-balanced cut points (`method.cuts: balanced`), the ones its published GPU memory was
# measured with: `InfoPro_balanced_memory` of the authors' configs.py (CIFAR-10), entry [s, l] = after
# BasicBlock l (0-based) of stage s, here as the index of the layer that starts each module
# ((s − 1)·n + l + 2: layer 0 is the stem). Only ResNet-110 has them.
BALANCED_CUTS: dict[str, dict[int, list[int]]] = {"resnet110": {2: [16], 3: [11, 22], 4: [8, 16, 28]}}
CIFAR_STAGES: list[tuple[int, int]] = [(16, 1), (32, 2), (64, 2)]
cifar_resnet("resnet32", 32)
cifar_resnet("resnet110", 110)
