"""Read prepared splits (memory-mapped, checksum-verified) and serve batches: normalised image tensors,
or for text dicts of token ids trimmed to the batch's longest document."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from scpl_kit.data.augment import Augmentation
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.prepare import SPLITS, sha256
from scpl_kit.signal import FEATURES, LABELS, LENGTHS


class SplitDataset(Dataset):
    """Indexed by a *list* of indices, so one fancy-index on the memory map fetches a whole batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: list[float], std: list[float], augmentation: Augmentation | None) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.ascontiguousarray(self.images[indices]))
        labels = torch.from_numpy(np.asarray(self.labels[indices]))
        if self.augmentation is not None:
            images, labels = self.augmentation(images, labels)
        return (images.float().div_(255) - self.mean) / self.std, labels


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
    ) -> DataLoader:
        """Batches of `split`; shuffled, at most `max_batches` of them."""
        images, labels = self.splits[split]
        dataset = SplitDataset(images, labels, self.meta["mean"], self.meta["std"], augmentation)
        order = shuffled(dataset, generator, max_batches and max_batches * batch_size) if shuffle else SequentialSampler(dataset)
        return DataLoader(
            dataset, sampler=BatchSampler(order, batch_size, drop_last), batch_size=None,
            num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        )


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
    padding past it changes nothing (every model masks by `lengths`) but costs compute."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> None:
        self.tokens, self.lengths, self.labels = tokens, lengths, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        lengths = torch.from_numpy(self.lengths[indices].astype(np.int64))
        steps = int(lengths.max())
        features = torch.from_numpy(self.tokens[indices, :steps].astype(np.int64))
        return {FEATURES: features, LENGTHS: lengths, LABELS: torch.from_numpy(np.asarray(self.labels[indices]))}


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
    ) -> DataLoader:
        if augmentation is not None and augmentation.kind != "none":
            raise ValueError(
                f"trainer.augmentation={augmentation.kind} transforms images; {self.meta['dataset']} is text: "
                f"set trainer.augmentation=none"
            )
        tokens, labels = self.splits[split]
        dataset = TextSplitDataset(tokens, self.lengths[split], labels)
        order = shuffled(dataset, generator, max_batches and max_batches * batch_size) if shuffle else SequentialSampler(dataset)
        return DataLoader(
            dataset, sampler=BatchSampler(order, batch_size, drop_last), batch_size=None,
            num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        )
