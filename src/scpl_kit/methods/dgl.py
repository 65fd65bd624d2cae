"""DGL, decoupled greedy learning (Belilovsky et al., ICML 2020; methods.md §5).

Each module but the last learns from its own auxiliary classifier with cross-entropy: DGL's
spatially reduced head ('mlp-sr': pooling to a quarter of the side, three 1×1 convs, pooling to
2×2, a three-layer MLP; `heads.spatial_classifier`), trained each step on the detached input.
The last module's auxiliary problem is the network's own: its classifier is the model's predictor,
whose cross-entropy trains it. Modules are detached from each other, each with its own optimizer,
so DGL differs from Early Exit (methods.md §2) only in its heads and in that last module.
"""

from __future__ import annotations

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.heads import ClassifierHead, spatial_classifier
from scpl_kit.methods.units import LocalUnit
from scpl_kit.models.base import BlockModel


def greedy_units(model: BlockModel, heads: list[ClassifierHead | None]) -> list[LocalUnit]:
    """One unit per block with the given local heads; the last unit's blocks learn from the model's
    predictor (the network's classifier), as in DGL, InfoPro and ContSup."""
    last = len(model.blocks) - 1
    return [
        LocalUnit(f"block{k + 1}", block, head=head, predictor=model.predictor if k == last else None, predictor_trains_body=True)
        for k, (block, head) in enumerate(zip(model.blocks, heads))
    ]


@METHODS.register("dgl")
def build_dgl(model: BlockModel, num_classes: int, mlp_hidden: int | None = None, mlp_layers: int = 3, conv_layers: int = 3,
              side: int = 2) -> list[LocalUnit]:
    check_decouplable("dgl", model)
    shapes = model.block_output_shapes()
    heads = [ClassifierHead(spatial_classifier(shape, num_classes, mlp_hidden, mlp_layers, conv_layers, side)) for shape in shapes[:-1]]
    return greedy_units(model, [*heads, None])
