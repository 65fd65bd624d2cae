"""The one shape every model has: an ordered list of K blocks and a predictor head."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.utils.checkpoint
from torch import nn

from scpl_kit.registry import Registry
from scpl_kit.signal import FEATURES, LABELS, Signal, summary, without_summary

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


def run_blocks(blocks: Iterable[nn.Module], signal: Signal, checkpoint: bool = False) -> Signal:
    """Blocks in turn, each on the one before's output (its `summary` dropped). `checkpoint`: each
    block under activation checkpointing (torch.utils.checkpoint, non-reentrant): only its input is
    kept for the backward, which runs its forward again (the same random draws: dropout repeats).
    A recomputed BatchNorm updates its running statistics a second time."""
    for block in blocks:
        signal = without_summary(signal)
        if checkpoint and torch.is_grad_enabled():
            signal = torch.utils.checkpoint.checkpoint(run_block, block, signal, use_reentrant=False)
        else:
            signal = run_block(block, signal)
    return signal


class Chain(nn.Sequential):
    """Consecutive layers run as one block (the layers' own kinds decide how: tensors or signals).

    A model's *layers* are the finest places it can be cut (a VGG conv with its BatchNorm, ReLU and
    pool; a ResNet BasicBlock; a text model's embedding or sequence layer); a block of several
    layers is a Chain of them, so `BlockModel.recut` can regroup them into any K modules."""

    @property
    def takes_signal(self) -> bool:
        return any(getattr(layer, "takes_signal", False) for layer in self)

    def forward(self, x: torch.Tensor | Signal) -> torch.Tensor | Signal:
        if not self.takes_signal:
            return super().forward(x)
        signal = x
        for i, layer in enumerate(self):
            signal = run_block(layer, signal if i == 0 else without_summary(signal))
        return signal


def chain(layers: list[nn.Module]) -> nn.Module:
    """One block of `layers`: the layer itself when it is alone (its parameter names stay short)."""
    return layers[0] if len(layers) == 1 else Chain(*layers)


class CutError(ValueError):
    """K modules or cut points that do not fit the model; the message gives the valid range."""


def even_cuts(n_layers: int, modules: int) -> list[int]:
    """Where modules 2..K start when `n_layers` layers are cut into `modules` consecutive groups as
    evenly as possible (the first groups take one more when it does not divide): VGG8's 6 convs
    into 4 gives the paper's blocks [2, 2, 1, 1]; ResNet-18's 8 BasicBlocks into 4 gives 2 each."""
    size, extra = divmod(n_layers, modules)
    cuts, start = [], 0
    for k in range(modules - 1):
        start += size + (k < extra)
        cuts.append(start)
    return cuts


class BlockModel(nn.Module):
    """`blocks[0..K-1]` then `predictor`. Methods decide how the blocks are trained; this only runs them.

    `blocks` are given as modules (a block of one layer) or lists of layers (a `Chain`); `recut`
    regroups the same layers into other blocks. Called on a tensor it returns class scores; called on
    a signal (as BP's unit calls it) it returns the signal with the class scores as its features."""

    takes_signal = True

    def __init__(self, blocks: list[nn.Module | list[nn.Module]], predictor: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(chain(block) if isinstance(block, list) else block for block in blocks)
        self.predictor = predictor
        self.input_shape = tuple(input_shape)
        # The data's per-channel normalisation (set by `set_input_statistics`): a method that
        # reconstructs the input in pixels (InfoPro) undoes it. None: the input is taken as it is.
        self.input_mean: torch.Tensor | None = None
        self.input_std: torch.Tensor | None = None
        # InfoPro*'s memory-balanced cut points per K (`method.cuts: balanced`), where a model has them.
        self.balanced_cuts: dict[int, list[int]] = {}
        self.checkpoint = False  # activation checkpointing of each block when run end to end (BP's `checkpoint`)

    def set_input_statistics(self, mean: list[float], std: list[float]) -> None:
        """The per-channel mean and std the data was normalised with (prepared data's meta.json)."""
        self.input_mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.input_std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def layers(self) -> list[nn.Module]:
        """The model's layers in order: the finest cut points, each in exactly one block."""
        return [layer for block in self.blocks for layer in (block if isinstance(block, Chain) else [block])]

    def recut(self, modules: int | None = None, cuts: list[int] | str | None = None) -> None:
        """Regroup the layers into `modules` blocks of even size, or start a new block at each layer
        index in `cuts`; `cuts: balanced` takes the model's memory-balanced cuts for `modules`.
        The layers (and their parameters) stay the same objects."""
        layers = self.layers()
        n = len(layers)
        if cuts is None and modules is None:
            return
        if isinstance(cuts, str):
            if cuts != "balanced":
                raise CutError(f"method.cuts={cuts!r}: give layer indices, null (even cuts) or balanced")
            if modules not in self.balanced_cuts:
                have = ", ".join(map(str, sorted(self.balanced_cuts))) or "none"
                raise CutError(f"method.cuts=balanced: this model has balanced cuts for K = {have}, not method.modules={modules}")
            cuts = self.balanced_cuts[modules]
        if cuts is None:
            if not 1 <= modules <= n:
                raise CutError(f"method.modules={modules} does not fit this model: it has {n} layers, so K can be 1..{n}")
            cuts = even_cuts(n, modules)
        cuts = list(cuts)
        if modules is not None and len(cuts) != modules - 1:
            raise CutError(f"method.cuts {cuts} make {len(cuts) + 1} modules but method.modules={modules}; give one of them")
        if any(not 1 <= c < n for c in cuts) or cuts != sorted(set(cuts)):
            raise CutError(f"method.cuts {cuts} must be increasing layer indices in 1..{n - 1}: the model has {n} layers (0..{n - 1})")
        bounds = [0, *cuts, n]
        self.blocks = nn.ModuleList(chain(layers[a:b]) for a, b in zip(bounds, bounds[1:]))

    def forward(self, x: torch.Tensor | Signal) -> torch.Tensor | Signal:
        signal = run_blocks(self.blocks, x if isinstance(x, dict) else {FEATURES: x}, self.checkpoint)
        scores = self.predictor(summary(signal))
        return {**without_summary(signal), FEATURES: scores} if isinstance(x, dict) else scores

    def example_signal(self, batch: int = 1) -> Signal:
        """A dummy input of the model's shape (zeros: images); a model of another modality overrides it."""
        return {FEATURES: torch.zeros(batch, *self.input_shape)}

    def example_batch(self, batch: int, num_classes: int) -> Signal:
        """A training batch of dummy input (engines time units on it, the memory table measures on it);
        labels cycle through the classes, so a contrastive loss sees positives as on real batches."""
        return {**self.example_signal(batch), LABELS: torch.arange(batch) % num_classes}

    @torch.no_grad()
    def block_output_shapes(self) -> list[tuple[int, ...]]:
        """Shape (without batch) of what heads see of each block's output (its `summary` if it leaves
        one), found by one dummy forward. Heads (projectors, classifiers) are sized from this, so no
        layer width is hard-coded twice."""
        return [tuple(summary(signal).shape[1:]) for signal in self.block_outputs()]

    @torch.no_grad()
    def block_outputs(self, batch: int = 1, blocks: Iterable[nn.Module] | None = None) -> list[Signal]:
        """Each block's output signal on `example_signal(batch)`, in eval mode (BatchNorm untouched).
        `blocks`: other consecutive pieces of the model to run in turn instead (its `layers()`)."""
        was_training = self.training
        self.eval()
        signal, outputs = self.example_signal(batch), []
        for block in self.blocks if blocks is None else blocks:
            signal = run_block(block, without_summary(signal))
            outputs.append(signal)
        self.train(was_training)
        return outputs


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> BlockModel:
    return MODELS.build(name, input_shape, num_classes, **kwargs)
