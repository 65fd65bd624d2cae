"""A `Signal`: the small dict of named tensors that flows through blocks, units and engines.

Models, methods and engines all speak it, so it lives below all three. Every signal has `features`
(the activations); training adds `labels`. A text batch carries `lengths` (tokens before the padding)
beside its features, so every block, on whatever device or process, knows which positions are real.
A block may leave a `summary`: one vector per sample that stands for its output wherever a vector is
wanted (local heads, the predictor), e.g. the mean over a sequence's real tokens. Blocks whose output
heads take as it is (a vision block's feature map) leave none. A method whose later units need the
network's input (InfoPro reconstructs it, ContSup encodes it as context) carries it as `input`.
"""

from __future__ import annotations

import torch

Signal = dict[str, torch.Tensor]
FEATURES, LABELS, LENGTHS, SUMMARY, INPUT = "features", "labels", "lengths", "summary", "input"
# Kept on the host when a signal moves to a GPU: `lengths` is read there (the LSTM packs by CPU lengths),
# and a copy back from the GPU would make the host wait for it in every block; a block that masks on the
# GPU copies them over without waiting (models/text.py).
HOST_SIDE = frozenset({LENGTHS})


def moved(signal: Signal, device: torch.device) -> Signal:
    """`signal` on `device`, but for what stays on the host (HOST_SIDE)."""
    return {name: tensor if name in HOST_SIDE else tensor.to(device, non_blocking=True) for name, tensor in signal.items()}


def summary(signal: Signal) -> torch.Tensor:
    """What local heads and the predictor see of a block's output."""
    return signal.get(SUMMARY, signal[FEATURES])


def without_summary(signal: Signal) -> Signal:
    """A block's output as the next block takes it: the next block writes its own summary."""
    return {name: tensor for name, tensor in signal.items() if name != SUMMARY}


def network_input(signal: Signal) -> torch.Tensor:
    """The network's input: carried as `input` after the first unit, the features themselves before it."""
    return signal.get(INPUT, signal[FEATURES])
