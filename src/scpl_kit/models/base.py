"""The one shape every model has: an ordered list of K blocks and a predictor head."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from scpl_kit.registry import Registry
from scpl_kit.signal import FEATURES, SUMMARY, Signal, summary, without_summary

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


class SignalBlock(nn.Module):
    """A block that needs more than its input tensor: it takes the whole signal and returns it with new
    `features` (and a `summary`, if its output is not what heads take as it is). Text blocks are these:
    they read the batch's `lengths` beside the token features. Plain modules (tensor in, tensor out)
    are blocks too."""

    takes_signal = True

    def forward(self, signal: Signal) -> Signal:
        raise NotImplementedError


def run_block(block: nn.Module, signal: Signal) -> Signal:
    """One block on a signal, whichever kind of block it is."""
    if getattr(block, "takes_signal", False):
        return block(signal)
    return {**signal, FEATURES: block(signal[FEATURES])}


class BlockModel(nn.Module):
    """`blocks[0..K-1]` then `predictor`. Methods decide how the blocks are trained; this only runs them.

    Called on a tensor it returns class scores; called on a signal (as BP's unit calls it) it returns
    the signal with the class scores as its features."""

    takes_signal = True

    def __init__(self, blocks: list[nn.Module], predictor: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.predictor = predictor
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor | Signal) -> torch.Tensor | Signal:
        signal = x if isinstance(x, dict) else {FEATURES: x}
        for block in self.blocks:
            signal = run_block(block, without_summary(signal))
        scores = self.predictor(summary(signal))
        return {**without_summary(signal), FEATURES: scores} if isinstance(x, dict) else scores

    def example_signal(self, batch: int = 1) -> Signal:
        """A dummy input of the model's shape (zeros: images); a model of another modality overrides it."""
        return {FEATURES: torch.zeros(batch, *self.input_shape)}

    @torch.no_grad()
    def block_output_shapes(self) -> list[tuple[int, ...]]:
        """Shape (without batch) of what heads see of each block's output (its `summary` if it leaves
        one), found by one dummy forward. Heads (projectors, classifiers) are sized from this, so no
        layer width is hard-coded twice."""
        was_training = self.training
        self.eval()
        signal = self.example_signal()
        shapes = []
        for block in self.blocks:
            signal = run_block(block, without_summary(signal))
            shapes.append(tuple(summary(signal).shape[1:]))
        self.train(was_training)
        return shapes


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> BlockModel:
    return MODELS.build(name, input_shape, num_classes, **kwargs)
