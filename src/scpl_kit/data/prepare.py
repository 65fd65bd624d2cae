"""Decode a raw dataset once into compact, checksummed, stratified train/val/test splits.

Layout of `<processed_dir>/<dataset>/`: `{split}_images.npy` (uint8 [N, C, H, W]),
`{split}_labels.npy` (int64 [N]) and `meta.json` (classes, shapes, normalisation, checksums).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

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


def prepare_dataset(
    name: str, processed_dir: str | Path, raw_dir: str | Path, val_fraction: float, test_fraction: float,
    split_seed: int = 0, download: bool = True,
) -> Path:
    raw = SOURCES.get(name)(Path(raw_dir), download=download)
    splits = stratified_splits(raw, val_fraction, test_fraction, split_seed)
    out = Path(processed_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for split, (images, labels) in splits.items():
        for kind, array in (("images", np.ascontiguousarray(images, dtype=np.uint8)), ("labels", np.asarray(labels, dtype=np.int64))):
            path = out / f"{split}_{kind}.npy"
            np.save(path, array)
            checksums[path.name] = sha256(path)
    train_pixels = splits["train"][0].astype(np.float64) / 255.0  # normalisation from the training split only
    meta: dict[str, Any] = {
        "dataset": name,
        "source": raw.source,
        "classes": raw.classes,
        "num_classes": len(raw.classes),
        "input_shape": list(raw.images.shape[1:]),
        "mean": train_pixels.mean(axis=(0, 2, 3)).tolist(),
        "std": train_pixels.std(axis=(0, 2, 3)).tolist(),
        "sizes": {split: int(len(labels)) for split, (_, labels) in splits.items()},
        "val_fraction": val_fraction,
        "test_fraction": None if raw.test_images is not None else test_fraction,
        "split_seed": split_seed,
        "sha256": checksums,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
