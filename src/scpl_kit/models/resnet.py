"""ResNet-18 as the SCPL paper splits it into 4 blocks (methods.md §4).

Block 1 = stem (3×3 conv → 64) + two BasicBlocks 64→64; blocks 2-4 = two BasicBlocks each,
64→128, 128→256, 256→512, the first of each with stride 2; block 4 ends with global average
pooling, so it hands the predictor Linear(512, C) a vector. Two departures from the usual CIFAR
ResNet-18, both as methods.md §4 records the paper's model: LeakyReLU instead of ReLU, and a strided
shortcut that is a 3×3 conv (not 1×1), which adds about 1.4M parameters to the usual 11.2M.
`width` scales every channel count (0.125 gives 8, 16, 32, 64 channels).
"""

from __future__ import annotations

from torch import nn, Tensor

from scpl_kit.models.base import MODELS, BlockModel, check_image_input

STEM_CHANNELS = 64
# (output channels, stride of the stage's first BasicBlock): each later stage halves the side.
PAPER_STAGES: list[tuple[int, int]] = [(64, 1), (128, 2), (256, 2), (512, 2)]


def conv3x3(in_channels: int, out_channels: int, stride: int, batchnorm: bool) -> nn.Conv2d:
    # Padding 1 keeps the side (or halves it, rounding up, at stride 2), so any input ≥ 1×1 fits.
    # No bias when BatchNorm follows: its shift would cancel a bias anyway.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not batchnorm)


def norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


def activation() -> nn.Module:
    # PyTorch's default slope 0.01, which the SCPL authors' code keeps; in place saves one
    # activation-sized tensor per layer, as VGG's ReLU does.
    return nn.LeakyReLU(inplace=True)


class BasicBlock(nn.Module):
    """conv3×3(stride) + BN + LeakyReLU, conv3×3 + BN, add the shortcut, LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride, batchnorm)
        self.bn1 = norm(out_channels, batchnorm)
        self.act1 = activation()
        self.conv2 = conv3x3(out_channels, out_channels, 1, batchnorm)
        self.bn2 = norm(out_channels, batchnorm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:  # the sum needs the residual's shape
            self.shortcut = nn.Sequential(conv3x3(in_channels, out_channels, stride, batchnorm), norm(out_channels, batchnorm))
        self.act2 = activation()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


def stage(in_channels: int, out_channels: int, stride: int, batchnorm: bool) -> list[nn.Module]:
    """ResNet-18's two BasicBlocks per stage; only the first changes channels or side."""
    return [BasicBlock(in_channels, out_channels, stride, batchnorm), BasicBlock(out_channels, out_channels, 1, batchnorm)]


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0, batchnorm: bool = True) -> BlockModel:
    """Built in training mode with BatchNorm untouched: unlike VGG no dummy forward is needed, since
    global pooling makes the predictor's input the last stage's channel count whatever the side."""
    check_image_input("resnet18", input_shape, 1, "the dataset's images have no pixels")

    def scale(channels: int) -> int:
        return max(1, round(channels * width))

    stem_channels = scale(STEM_CHANNELS)
    stem = [conv3x3(input_shape[0], stem_channels, 1, batchnorm), norm(stem_channels, batchnorm), activation()]
    layers: list[list[nn.Module]] = []
    channels = stem_channels
    for out_channels, stride in PAPER_STAGES:
        layers.append(stage(channels, scale(out_channels), stride, batchnorm))
        channels = scale(out_channels)
    layers[0] = stem + layers[0]
    layers[-1] += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # block 4 hands over a [N, 512·width] vector
    blocks = [nn.Sequential(*block) for block in layers]
    return BlockModel(blocks, nn.Linear(channels, num_classes), input_shape)
