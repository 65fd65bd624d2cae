"""Early Exit (greedy local cross-entropy, methods.md §2): SCPL's shape with a classifier in place of
the projector and cross-entropy in place of SupCon.

One unit per block: block outputs are detached between blocks, each block trains with its own
classifier (its *exit*) in its own optimizer, and the last unit also trains the predictor on its
detached output. Inference uses the predictor; every exit's accuracy is recorded beside it.
"""

from __future__ import annotations

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.heads import ClassifierHead, build_projector
from scpl_kit.methods.units import LocalUnit
from scpl_kit.models.base import BlockModel

CLASSIFIERS = ("l", "m")  # SCPL's projector shapes ending in class scores; identity has no class scores


@METHODS.register("early_exit")
def build_early_exit(model: BlockModel, num_classes: int, classifier: str = "m", pool: bool = False, hidden: int = 512) -> list[LocalUnit]:
    """`classifier`: `m` = Flatten → Linear(in, hidden) → ReLU → Linear(hidden, C), SCPL's projector
    with C outputs; `l` = one Linear. `pool` averages the feature map over space first."""
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown early-exit classifier {classifier!r}; valid classifiers: {', '.join(CLASSIFIERS)}")
    check_decouplable("early_exit", model)
    last = len(model.blocks) - 1
    return [
        LocalUnit(
            f"block{k + 1}", block, head=ClassifierHead(build_projector(classifier, shape, pool, hidden, num_classes)),
            predictor=model.predictor if k == last else None,
        )
        for k, (block, shape) in enumerate(zip(model.blocks, model.block_output_shapes()))
    ]
