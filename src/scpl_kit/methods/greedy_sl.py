"""Greedy SL, greedy supervised learning as the InfoPro paper runs it (Wang et al., ICLR 2021, its
"Greedy SL" rows; methods.md §5).

Each module but the last learns from a pooled linear classifier with cross-entropy: global average
pooling, then one Linear to the classes (the authors' auxiliary net '0c1f', "Greedy Supervised
Learning", InfoPro-Pytorch auxiliary_nets.py); the last module learns from the network's own
classifier. It differs from Early Exit (the SCPL paper's method, a flattened MLP on every block,
whose last block also learns from its own exit) in the head and in that last module, and from DGL
only in the head.
"""

from __future__ import annotations

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.dgl import greedy_units
from scpl_kit.methods.heads import ClassifierHead, build_projector
from scpl_kit.methods.units import LocalUnit
from scpl_kit.models.base import BlockModel


@METHODS.register("greedy_sl")
def build_greedy_sl(model: BlockModel, num_classes: int) -> list[LocalUnit]:
    check_decouplable("greedy_sl", model)
    heads = [ClassifierHead(build_projector("l", shape, pool=len(shape) == 3, out=num_classes)) for shape in model.block_output_shapes()[:-1]]
    return greedy_units(model, [*heads, None])
