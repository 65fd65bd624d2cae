"""BP: end-to-end backpropagation — one unit, one optimizer, cross-entropy at the end, nothing detached."""

from __future__ import annotations

from scpl_kit.methods import METHODS
from scpl_kit.methods.heads import CrossEntropyHead
from scpl_kit.methods.units import LocalUnit, Network
from scpl_kit.models.base import BlockModel


class EndToEndUnit(LocalUnit):
    """The whole model as one unit; a pipelining engine may cut it into stages (`network`)."""

    body: BlockModel

    def network(self) -> Network:
        return Network(list(self.body.blocks), self.body.predictor, self.head, self.head_loss_name, self.body.example_signal())


@METHODS.register("bp")
def build_bp(model: BlockModel, num_classes: int) -> list[LocalUnit]:
    return [EndToEndUnit(f"blocks1-{len(model.blocks)}", model, head=CrossEntropyHead(), head_scope="predictor")]
