"""Read prepared splits (memory-mapped, checksum-verified) and serve batches: image tensors (uint8 off
the disk, normalised on the training device), or for text dicts of token ids trimmed to the batch's
longest document."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from scpl_kit.data.augment import Augmentation
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.prepare import SPLITS, sha256
from scpl_kit.data.share import WHOLE, Share
from scpl_kit.signal import FEATURES, LABELS, LENGTHS, moved


def batch_key(key: list[int] | tuple[int, list[int]]) -> tuple[int | None, list[int]]:
    """(seed, indices) of a sampler's batch: shuffled batches come with a seed, others without."""
    return key if isinstance(key, tuple) else (None, key)


class SplitDataset(Dataset):
    """Indexed by a *list* of indices, so one fancy-index on the memory map fetches a whole batch (or
    its `share`'s rows of it, data/share.py); a training batch comes as (seed, indices) and leaves
    with its seed and its size, which its augmentation draws from on the device (`Batches`), so the
    batches are the same whichever loader worker, or none, fetched them. Images stay uint8: a quarter of
    float32's bytes to copy to the device."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, share: Share = WHOLE) -> None:
        self.images, self.labels, self.share = images, labels, share

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: list[int] | tuple[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor, int | None, int]:
        seed, indices = batch_key(key)
        mine = indices[self.share.rows(len(indices))]
        return torch.from_numpy(np.ascontiguousarray(self.images[mine])), torch.from_numpy(np.asarray(self.labels[mine])), seed, len(indices)


class SeededBatches(Sampler):
    """A BatchSampler's batches, each with a seed of its own drawn from `generator` in the main process
    (its augmentation draws from it, whichever worker fetched the batch)."""

    def __init__(self, batches: BatchSampler, generator: torch.Generator | None) -> None:
        self.batches, self.generator = batches, generator

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        for indices in self.batches:
            yield int(torch.randint(2**62, (), generator=self.generator)), indices


class Batches:
    """A loader's batches on `device` (None: the CPU), images augmented and normalised there: uint8 crosses
    to the device, float32 is made on it, and the augmentation runs batched, drawing from each batch's
    own seed. Text batches move as they are (their lengths stay on the host, signal.HOST_SIDE). Has the
    loader's length; iterating starts its workers (kept between epochs). `share`: the part of every
    batch read (the engines' replicas.read_share knows a loader made for its share by it)."""

    def __init__(self, loader: DataLoader, mean: list[float] | None = None, std: list[float] | None = None,
                 device: torch.device | None = None, augmentation: Augmentation | None = None, share: Share = WHOLE) -> None:
        self.loader, self.device, self.augmentation, self.share = loader, device, augmentation, share
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.draws = torch.Generator(device=device or "cpu")  # reseeded from every batch's seed

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if isinstance(batch, dict):
                yield batch if self.device is None else moved(batch, self.device)
                continue
            images, labels, seed, total = batch
            if self.device is not None:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            images = images.float().div_(255)
            if self.augmentation is not None and self.augmentation.kind != "none":
                draws = self.draws.manual_seed(seed if seed is not None else 0)
                images, labels = self.augmentation(images, labels, draws, total, self.share.rows(total))
            yield (images - self.mean) / self.std, labels


class OwnedBatches(Sampler):
    """The batches of `batches` that `owned()` (asked as each epoch starts) gives this process. The others
    are drawn all the same, seeds included, so every process walks the same sequence; the length is the
    epoch's, as every process counts the job's batches."""

    def __init__(self, batches: Sampler, owned: Callable[[], Iterator[bool]]) -> None:
        self.batches, self.owned = batches, owned

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        return (key for key, mine in zip(self.batches, self.owned()) if mine)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None, num_workers: int, drop_last: bool,
                max_batches: int | None, share: Share = WHOLE) -> DataLoader:
    """Whole batches per fetch (or the batches `share` owns); shuffled ones come with their seeds.
    `num_workers` processes fetch them ahead, started once and kept over the epochs (persistent); the
    order is the sampler's."""
    if shuffle:
        sampler: Sampler = SeededBatches(BatchSampler(shuffled(dataset, generator, max_batches and max_batches * batch_size), batch_size, drop_last), generator)
    else:
        sampler = BatchSampler(SequentialSampler(dataset), batch_size, drop_last)
    if share.owned is not None:
        sampler = OwnedBatches(sampler, share.owned)
    # generator: the loader's own draw of its workers' base seed (unused: batches carry theirs) comes from
    # it, not from torch's global stream, which would then depend on whether workers are kept or restarted.
    return DataLoader(
        dataset, sampler=sampler, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
    )


@dataclass
class PreparedData:
    meta: dict[str, Any]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["input_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def embeddings(self) -> torch.Tensor | None:
        """Pretrained word vectors to start a model from; images have none."""
        return None

    def loader(
        self, split: str, batch_size: int, shuffle: bool = False, augmentation: Augmentation | None = None,
        generator: torch.Generator | None = None, num_workers: int = 0, drop_last: bool = False, max_batches: int | None = None,
        device: torch.device | None = None, share: Share = WHOLE,
    ) -> Batches:
        """Batches of `split` (their `share` of rows), normalised on `device`; shuffled, at most
        `max_batches` of them. Shuffled batches draw their order and their augmentation from `generator`:
        reseed it before an epoch to get that epoch's batches again (the loader, and its workers, can be kept)."""
        images, labels = self.splits[split]
        loader = make_loader(SplitDataset(images, labels, share), batch_size, shuffle, generator, num_workers, drop_last, max_batches, share)
        return Batches(loader, self.meta["mean"], self.meta["std"], device, augmentation, share)


def shuffled(dataset: Dataset, generator: torch.Generator | None, samples: int | None) -> RandomSampler:
    """A new random order each epoch; with `samples`, only that many of it (`trainer.steps_per_epoch`: a
    different random subset each epoch). Without, the sampler draws exactly what it always drew."""
    if samples is None or samples >= len(dataset):
        return RandomSampler(dataset, generator=generator)
    return RandomSampler(dataset, generator=generator, num_samples=samples)


def prepare_hint(name: str, processed_dir: str | Path, settings: dict[str, Any] | None = None) -> str:
    """The command that prepares exactly this dataset (`dvc repro prepare` prepares the pipeline
    profile's dataset, which may be another one), with `settings` that differ from the data config's."""
    where = "" if Path(processed_dir) == Path("data/processed") else f" data.processed_dir={processed_dir}"
    changed = "".join(f" data.{key}={'null' if value is None else value}" for key, value in (settings or {}).items())
    return f"prepare it with `python -m scpl_kit.prepare data={name}{changed}{where}`"


def load_prepared(name: str, processed_dir: str | Path, verify: bool = True, expect: dict[str, Any] | None = None) -> PreparedData:
    """Open `<processed_dir>/<name>`; with `verify`, every file must match its recorded sha256.

    `expect` holds split settings (e.g. val_fraction) and source options (e.g. image_size) the data must
    have been prepared with; a key that meta.json lacks is not checked (data prepared before it existed).
    """
    folder = Path(processed_dir) / name
    meta_path = folder / "meta.json"
    hint = prepare_hint(name, processed_dir)
    if not meta_path.is_file():
        raise DatasetNotFoundError(f"prepared data for {name!r} not found at {folder}; {hint}")
    try:
        meta = json.loads(meta_path.read_text())
        checksums = dict(meta["sha256"])
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptDataError(f"{meta_path} is unreadable ({type(error).__name__}: {error}); {hint}") from None
    strict = set(meta.get("source_options", ()))  # recorded options, compared even when null (glove=null vs a path)
    for key, wanted in (expect or {}).items():
        if (meta.get(key) is not None or key in strict) and meta.get(key) != wanted:
            hint = prepare_hint(name, processed_dir, {key: wanted})
            raise CorruptDataError(f"{folder} was prepared with {key}={meta[key]} but the config asks for {wanted}; {hint}")
    for file, recorded in checksums.items():
        path = folder / file
        if not path.is_file():
            raise DatasetNotFoundError(f"{path} is missing; {hint}")
        if verify and sha256(path) != recorded:
            raise CorruptDataError(f"{path} does not match its checksum (corrupt or edited); {hint}")
    if meta.get("modality") == "text":
        return TextPreparedData.from_folder(folder, meta)
    splits = {
        split: (np.load(folder / f"{split}_images.npy", mmap_mode="r"), np.load(folder / f"{split}_labels.npy", mmap_mode="r"))
        for split in SPLITS
    }
    return PreparedData(meta, splits)


class TextSplitDataset(Dataset):
    """Indexed by a list of indices, as SplitDataset; a batch is cut to its longest document, since the
    padding past it changes nothing (every model masks by `lengths`) but costs compute. A share of a
    batch keeps the whole batch's length, as a slice of the whole batch would."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, labels: np.ndarray, share: Share = WHOLE) -> None:
        self.tokens, self.lengths, self.labels, self.share = tokens, lengths, labels, share

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: list[int] | tuple[int, list[int]]) -> dict[str, torch.Tensor]:
        _, indices = batch_key(key)  # text is not augmented: the seed is unused
        steps = int(self.lengths[indices].max())
        mine = indices[self.share.rows(len(indices))]
        features = torch.from_numpy(self.tokens[mine, :steps].astype(np.int64))
        lengths = torch.from_numpy(self.lengths[mine].astype(np.int64))
        return {FEATURES: features, LENGTHS: lengths, LABELS: torch.from_numpy(np.asarray(self.labels[mine]))}


@dataclass
class TextPreparedData(PreparedData):
    """`splits[split]` = (token ids [N, max_len], labels): as images, so code reading labels is shared."""

    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    folder: Path = Path(".")

    @classmethod
    def from_folder(cls, folder: Path, meta: dict[str, Any]) -> TextPreparedData:
        def load(file: str) -> np.ndarray:
            return np.load(folder / file, mmap_mode="r")

        splits = {split: (load(f"{split}_tokens.npy"), load(f"{split}_labels.npy")) for split in SPLITS}
        return cls(meta, splits, {split: load(f"{split}_lengths.npy") for split in SPLITS}, folder)

    @property
    def vocabulary(self) -> list[str]:
        return (self.folder / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]

    @cached_property
    def embeddings(self) -> torch.Tensor | None:
        """Pretrained word vectors [vocabulary, glove_dim] (row i = id i), when prepared with GloVe; read once
        (evaluate builds every run of a grid from the same data)."""
        if "embeddings.npy" not in self.meta["sha256"]:  # a stale file from an earlier prepare does not count
            return None
        return torch.from_numpy(np.load(self.folder / "embeddings.npy"))

    def loader(
        self, split: str, batch_size: int, shuffle: bool = False, augmentation: Augmentation | None = None,
        generator: torch.Generator | None = None, num_workers: int = 0, drop_last: bool = False, max_batches: int | None = None,
        device: torch.device | None = None, share: Share = WHOLE,
    ) -> Batches:
        if augmentation is not None and augmentation.kind != "none":
            raise ValueError(
                f"trainer.augmentation={augmentation.kind} transforms images; {self.meta['dataset']} is text: "
                f"set trainer.augmentation=none"
            )
        tokens, labels = self.splits[split]
        dataset = TextSplitDataset(tokens, self.lengths[split], labels, share)
        return Batches(make_loader(dataset, batch_size, shuffle, generator, num_workers, drop_last, max_batches, share), device=device, share=share)
