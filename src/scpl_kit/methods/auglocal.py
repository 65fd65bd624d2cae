"""AugLocal, local learning with augmented auxiliary networks (Ma et al., ICLR 2024; code
github.com/ChenxiangMA/AugLocal).

Greedy local learning (each module but the last learns from its own auxiliary classifier with
cross-entropy, its output handed on detached; the last learns from the network's classifier, as DGL)
whose auxiliary network for module j is built from the primary network's layers that *follow* it:

- depth: d_j = max(1, round(d − γ·(d − 1)·j / (K − 2))) for modules j = 0 .. K − 2, shrinking linearly
  from `depth` d at the first module towards 1 (γ = `pyramid`, 0.5 in the authors' runs);
- layers: with e the index of the module's last layer among the model's n layers, the d_j layers
  round(e + (n − e − 1)/d_j · i) for i = 1 .. d_j, a uniform sample of the rest ending at the last layer
  (all the rest when d_j ≥ n − 1 − e). Python's round (half to even), as the authors';
- each sampled layer becomes a new BasicBlock (fresh weights) at that layer's width; a block strides 2
  when the widths so far have doubled more often than the blocks have strided (the authors' rule);
- global average pooling, a BatchNorm1d when d_j = 1, a Linear to the classes.

K is the number of modules here; the authors' `--local_module_num` is K + d (their K = 16, d = 2 trains
14 modules: the last layers, whose auxiliary net would be the whole rest of the network, join the
last module). What else differs: docs/deviations.md.
"""

from __future__ import annotations

import math

from torch import nn

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.dgl import greedy_units
from scpl_kit.methods.heads import ClassifierHead
from scpl_kit.methods.infopro import require_images
from scpl_kit.methods.units import LocalUnit
from scpl_kit.models.base import BlockModel, Chain
from scpl_kit.models.resnet import BasicBlock
from scpl_kit.signal import summary


def module_depths(depth: int, modules: int, pyramid: float) -> list[int]:
    """d_j for the K − 1 modules that have an auxiliary net (the authors' pyramidal depth)."""
    local = modules - 1
    share = [j / (local - 1) if local > 1 else 0.0 for j in range(local)]
    return [max(1, round(depth - pyramid * (depth - 1) * s)) for s in share]


def sampled_layers(last: int, n_layers: int, depth: int) -> list[int]:
    """The primary layers module j's auxiliary net imitates: `depth` of those after layer `last`, uniformly."""
    rest = n_layers - 1 - last
    if depth >= rest:
        return list(range(last + 1, n_layers))
    return [round(last + rest / depth * i) for i in range(1, depth + 1)]


def last_layers(model: BlockModel) -> list[int]:
    """The index of each block's last layer among the model's layers."""
    ends, count = [], 0
    for block in model.blocks:
        count += len(block) if isinstance(block, Chain) else 1
        ends.append(count - 1)
    return ends


def auxiliary_net(in_channels: int, widths: list[int], num_classes: int, batchnorm: bool) -> nn.Sequential:
    """New BasicBlocks at `widths` (ReLU, 1×1 shortcut), then pooling, a BatchNorm1d if `batchnorm` (the
    authors' head for depth 1) and a Linear."""
    layers: list[nn.Module] = []
    pending, channels = 0, in_channels
    for width in widths:
        pending += int(math.log2(max(1, width // channels)))  # how often the width doubled since the last stride
        stride = 2 if pending >= 1 else 1
        pending -= stride == 2
        layers.append(BasicBlock(channels, width, stride, batchnorm=True, leaky=False, shortcut_kernel=1))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if batchnorm:
        layers.append(nn.BatchNorm1d(channels))
    return nn.Sequential(*layers, nn.Linear(channels, num_classes))


@METHODS.register("auglocal")
def build_auglocal(model: BlockModel, num_classes: int, depth: int = 2, pyramid: float = 0.5) -> list[LocalUnit]:
    if depth < 1 or not 0 <= pyramid <= 1:
        raise ValueError(f"auglocal needs depth >= 1 and 0 <= pyramid <= 1, got depth={depth}, pyramid={pyramid}")
    check_decouplable("auglocal", model)
    # One dummy forward layer by layer: every layer's width, and each block's output at its last layer.
    layer_shapes = [tuple(summary(signal).shape[1:]) for signal in model.block_outputs(blocks=model.layers())]
    ends = last_layers(model)
    shapes = [layer_shapes[end] for end in ends]
    require_images("auglocal", shapes[:-1], model.input_shape)
    widths = [shape[0] for shape in layer_shapes]
    heads = [
        ClassifierHead(auxiliary_net(shape[0], [widths[t] for t in sampled_layers(end, len(widths), d)], num_classes, d <= 1))
        for shape, end, d in zip(shapes, ends, module_depths(depth, len(model.blocks), pyramid))
    ]
    return greedy_units(model, [*heads, None])
