"""BP: end-to-end backpropagation — one unit, one optimizer, cross-entropy at the end, nothing detached."""

from __future__ import annotations

from scpl_kit.methods import METHODS
from scpl_kit.methods.heads import CrossEntropyHead
from scpl_kit.methods.units import LocalUnit
from scpl_kit.models.base import BlockModel


@METHODS.register("bp")
def build_bp(model: BlockModel, num_classes: int) -> list[LocalUnit]:
    return [LocalUnit(f"blocks1-{len(model.blocks)}", model, head=CrossEntropyHead(), head_scope="predictor")]
