"""Decode a raw dataset once into compact, checksummed, stratified train/val/test splits.

Layout of `<processed_dir>/<dataset>/`: `{split}_images.npy` (uint8 [N, C, H, W]),
`{split}_labels.npy` (int64 [N]) and `meta.json` (classes, shapes, normalisation, checksums, and the
source's options such as image_size, so training can refuse data prepared with other ones).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from scpl_kit.data.sources import SOURCES, RawData

SPLITS = ("train", "val", "test")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stratified_splits(raw: RawData, val_fraction: float, test_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Deterministic stratified splits. An official test split is kept as is; otherwise one is cut."""
    from sklearn.model_selection import train_test_split  # only when preparing: training never pays its import

    images, labels = raw.images, raw.labels
    if raw.test_images is not None:
        test, remaining = (raw.test_images, raw.test_labels), 1.0
    else:
        images, test_x, labels, test_y = train_test_split(images, labels, test_size=test_fraction, stratify=labels, random_state=seed)
        test, remaining = (test_x, test_y), 1.0 - test_fraction
    # val_fraction is a fraction of the whole dataset, hence of what is left after the test cut.
    train_x, val_x, train_y, val_y = train_test_split(
        images, labels, test_size=val_fraction / remaining, stratify=labels, random_state=seed
    )
    return {"train": (train_x, train_y), "val": (val_x, val_y), "test": test}


def _pixels(images: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), chunk):
        yield images[start : start + chunk].astype(np.float64) / 255.0


def channel_stats(images: np.ndarray, max_bytes: int = 1 << 28) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels in [0, 1], from float64 copies of at most `max_bytes`: one copy
    of Tiny-ImageNet's training split at 64×64 would take 8.8 GB (and std a second one)."""
    chunk = max(1, max_bytes // (images[0].size * 8))
    if len(images) <= chunk:  # numpy's whole-array floats, exactly those of data prepared before
        pixels = next(_pixels(images, chunk))
        return pixels.mean(axis=(0, 2, 3)).tolist(), pixels.std(axis=(0, 2, 3)).tolist()
    # Per-image sums added in image order: for 3 channels the same floats as the whole-array path.
    n, _, height, width = images.shape
    sums = np.concatenate([p.sum(axis=(2, 3)) for p in _pixels(images, chunk)])  # [N, C]
    mean = sums.sum(axis=0) / (n * height * width)
    squares = np.concatenate([np.square(p - mean[:, None, None]).sum(axis=(2, 3)) for p in _pixels(images, chunk)])
    return mean.tolist(), np.sqrt(squares.sum(axis=0) / (n * height * width)).tolist()


def prepare_dataset(
    name: str, processed_dir: str | Path, raw_dir: str | Path, val_fraction: float, test_fraction: float,
    split_seed: int = 0, download: bool = True, **options: Any,
) -> Path:
    """`options` are the source's own (e.g. image_size=64, see `source_options`); they are recorded in meta.json."""
    raw = SOURCES.get(name)(Path(raw_dir), download=download, **options)
    splits = stratified_splits(raw, val_fraction, test_fraction, split_seed)
    out = Path(processed_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for split, (images, labels) in splits.items():
        for kind, array in (("images", np.ascontiguousarray(images, dtype=np.uint8)), ("labels", np.asarray(labels, dtype=np.int64))):
            path = out / f"{split}_{kind}.npy"
            np.save(path, array)
            checksums[path.name] = sha256(path)
    mean, std = channel_stats(splits["train"][0])  # normalisation from the training split only
    meta: dict[str, Any] = {
        "dataset": name,
        "source": raw.source,
        "classes": raw.classes,
        "num_classes": len(raw.classes),
        "input_shape": list(raw.images.shape[1:]),
        "mean": mean,
        "std": std,
        "sizes": {split: int(len(labels)) for split, (_, labels) in splits.items()},
        "val_fraction": val_fraction,
        "test_fraction": None if raw.test_images is not None else test_fraction,
        "split_seed": split_seed,
        **options,
        "sha256": checksums,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
