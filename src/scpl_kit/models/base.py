"""The one shape every model has: an ordered list of K blocks and a predictor head."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from scpl_kit.registry import Registry

ModelBuilder = Callable[..., "BlockModel"]
MODELS: Registry[ModelBuilder] = Registry("model")


class BlockModel(nn.Module):
    """`blocks[0..K-1]` then `predictor`. Methods decide how the blocks are trained; this only runs them."""

    def __init__(self, blocks: list[nn.Module], predictor: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.predictor = predictor
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.predictor(x)

    @torch.no_grad()
    def block_output_shapes(self) -> list[tuple[int, ...]]:
        """Shape (without batch) of each block's output, found by one dummy forward.

        Heads (projectors, classifiers) are sized from this, so no layer width is hard-coded twice.
        """
        was_training = self.training
        self.eval()
        x = torch.zeros(1, *self.input_shape)
        shapes = []
        for block in self.blocks:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
        self.train(was_training)
        return shapes


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> BlockModel:
    return MODELS.get(name)(input_shape=input_shape, num_classes=num_classes, **kwargs)
