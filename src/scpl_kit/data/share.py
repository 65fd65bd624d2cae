"""Which part of every batch a process reads.

Engines that spread a batch over processes (data parallelism, replicated pipelines) train each
process on slice `part` of `parts` equal slices of the batch, in order, as `torch.tensor_split` cuts
it. An engine states that share (`Engine.share`; engines/replicas.py reads it), and the loader built for it fetches, copies to the
device and augments only those rows: no process reads, copies or augments the rows of another. What
each process trains on stays what a slice of the whole batch would give: an image keeps the
augmentation it gets in the whole batch (its random draws are its row of the whole batch's draws,
data/augment.py), and a text slice keeps the whole batch's padding.

With two augmented views per image, a share holds both views of its images: [view 1; view 2] of its
rows, where cutting the whole augmented batch [view 1 of all; view 2 of all] would give one process
the first views of every image. The processes together still train on exactly the whole batch's
samples (the same tensors, in another order), which is what a batch-averaged loss and SupCon over
the gathered slices (batch_group) compute from.

A share may also hold only some of the batches (`owned`: the asynchronous engine gives each batch to
one worker): the loader then fetches only those, while still drawing every batch's order and seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from scpl_kit.signal import Signal


@dataclass(frozen=True)
class Share:
    part: int = 0
    parts: int = 1
    owned: Callable[[], Iterator[bool]] | None = None  # asked as an epoch starts: whether each of its batches is this process's

    def __post_init__(self) -> None:
        if not 0 <= self.part < self.parts:
            raise ValueError(f"a share is part 0…{self.parts - 1} of {self.parts}, not {self.part}")

    def rows(self, total: int) -> slice:
        """This share's rows of a batch of `total` samples (tensor_split's cut: the first total % parts
        slices take one more)."""
        size, extra = divmod(total, self.parts)
        start = self.part * size + min(self.part, extra)
        return slice(start, start + size + (self.part < extra))

    def of(self, signal: Signal) -> Signal:
        """This share's slice of every tensor of a whole batch."""
        return {name: tensor.tensor_split(self.parts)[self.part] for name, tensor in signal.items()}


WHOLE = Share()

