"""SCPL: every block learns from its own SupCon loss on a projection of its output (methods.md §2).

One unit per block, so block outputs are detached between blocks and each block (with its
projector) has its own optimizer; the last unit also trains the predictor on its detached output.
"""

from __future__ import annotations

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.heads import SupConHead, build_projector
from scpl_kit.methods.losses import Variant
from scpl_kit.methods.units import LocalUnit
from scpl_kit.models.base import BlockModel


@METHODS.register("scpl")
def build_scpl(
    model: BlockModel,
    num_classes: int,
    projector: str = "m",
    pool: bool = False,
    projector_hidden: int = 512,
    projector_dim: int = 1024,
    temperature: float = 0.1,
    variant: Variant = "paper",
) -> list[LocalUnit]:
    check_decouplable("scpl", model)
    shapes = model.block_output_shapes()
    last = len(model.blocks) - 1
    units = []
    for k, (block, shape) in enumerate(zip(model.blocks, shapes)):
        head = SupConHead(build_projector(projector, shape, pool, projector_hidden, projector_dim), temperature, variant)
        units.append(LocalUnit(f"block{k + 1}", block, head=head, predictor=model.predictor if k == last else None))
    return units
