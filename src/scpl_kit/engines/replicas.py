"""Batch slicing and replication, shared by the engines that hold copies of units on several
processes (DDP, hierarchical averaging, replicated pipelines, asynchronous workers)."""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from scpl_kit.data.share import WHOLE, Share
from scpl_kit.engines.base import Batch, ReadoutCollector, as_signal, batch_size
from scpl_kit.methods.units import LocalUnit
from scpl_kit.signal import FEATURES, Signal, moved


def read_share(batches: Iterable[Batch], share: Share, with_labels: bool = True) -> Iterator[tuple[Signal | None, int]]:
    """(`share`'s slice, the whole batch's size in samples) for every batch of the epoch; (None, 0) for
    a batch the share does not own. A loader made for `share` (its `share` attribute, data/datasets.py)
    delivers the slices, and only the owned batches, itself; any other iterable of whole batches (a
    test's list, a loader made for the whole batch) is cut and skipped here."""
    delivered = getattr(batches, "share", WHOLE)
    if delivered not in (WHOLE, share):
        raise ValueError(f"these batches were read for {delivered}, not for {share}")
    source = iter(batches)
    owned = itertools.islice(share.owned(), len(batches)) if share.owned is not None else itertools.repeat(True)  # type: ignore[arg-type]
    for mine in owned:
        if not mine:
            if delivered != share:
                next(source)  # read, and left to its owner
            yield None, 0
            continue
        batch = next(source, None)
        if batch is None:  # the last batch
            return
        signal = as_signal(batch, with_labels)
        if delivered == share:
            yield signal, len(signal[FEATURES]) * share.parts
        else:
            yield share.of(signal), len(signal[FEATURES])


def check_even_split(example: Signal | None, parts: int, what: str) -> None:
    if example is not None and batch_size(example) % parts:
        raise ValueError(
            f"trainer.batch_size={batch_size(example)} does not split evenly over {parts} {what}: make it a multiple "
            f"of {parts} (each trains on an equal slice of every batch)"
        )


def replicated(unit: LocalUnit, device: torch.device, group: dist.ProcessGroup | None = None) -> DistributedDataParallel:
    """`unit` under DistributedDataParallel over `group` (all ranks: None). DDP broadcasts the weights of
    the group's first rank at the start, and its BatchNorm statistics before every training forward."""
    return DistributedDataParallel(unit, device_ids=[device.index] if device.type == "cuda" else None, process_group=group)


def predict_in_slices(units: list[LocalUnit], route: list[tuple[int, str]], batches: Iterable[Batch], device: torch.device) -> dict[str, torch.Tensor]:
    """Inference when every process holds the same units: each answers its slice of every batch, and
    the slices come back together, in order, on every process (collective)."""
    world = dist.get_world_size()
    parts = []
    for signal, _ in read_share(batches, Share(dist.get_rank(), world), with_labels=False):  # type: ignore[misc]  (no batch is skipped)
        collected = ReadoutCollector()
        for i, phase in route:
            signal = units[i].infer(moved(signal, device), phase)
        collected.add(signal)
        parts.append(collected.result())
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, parts)
    names = gathered[0][0].keys() if parts else ()
    return {name: torch.cat([rank_parts[b][name] for b in range(len(parts)) for rank_parts in gathered]) for name in names}
