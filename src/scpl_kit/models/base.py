"""The one shape every model has: an ordered list of K blocks and a predictor head."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from scpl_kit.registry import Registry

ModelBuilder = Callable[..., "BlockModel"]
MODELS: Registry[ModelBuilder] = Registry("model")


class ModelInputError(ValueError):
    """An input shape a model cannot take; the message names the smallest it accepts and the fix."""


def check_image_input(model: str, input_shape: tuple[int, ...], min_side: int, fix: str) -> None:
    """Raise ModelInputError unless `input_shape` is (channels, height, width), both sides ≥ `min_side`.

    Checked before any layer runs, so a too-small input gets one line that says what to change,
    not PyTorch's "Output size is too small" from deep inside a dummy forward.
    """
    if len(input_shape) != 3:
        raise ModelInputError(f"model {model!r} takes images shaped (channels, height, width), got input shape {tuple(input_shape)}")
    height, width = input_shape[1:]
    if min(height, width) < min_side:
        raise ModelInputError(f"model {model!r} needs inputs of at least {min_side}×{min_side}, got {height}×{width}; {fix}")


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
    return MODELS.build(name, input_shape, num_classes, **kwargs)
