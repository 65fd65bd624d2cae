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
        body = self.body
        return Network(list(body.blocks), body.predictor, self.head, self.head_loss_name, body.example_signal(), body.checkpoint)


@METHODS.register("bp")
def build_bp(model: BlockModel, num_classes: int, checkpoint: bool = False) -> list[LocalUnit]:
    """`checkpoint`: activation checkpointing of every block (memory for time: each block's forward runs
    again in the backward), under any engine that runs the network end to end or in stages."""
    model.checkpoint = checkpoint
    return [EndToEndUnit(f"blocks1-{len(model.blocks)}", model, head=CrossEntropyHead(), head_scope="predictor")]
