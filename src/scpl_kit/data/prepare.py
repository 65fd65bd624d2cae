"""Decode a raw dataset once into compact, checksummed, stratified train/val/test splits.

Layout of `<processed_dir>/<dataset>/`: `{split}_images.npy` (uint8 [N, C, H, W]),
`{split}_labels.npy` (int64 [N]) and `meta.json` (classes, shapes, normalisation, checksums, and the
source's options such as image_size, so training can refuse data prepared with other ones).
A text dataset has `{split}_tokens.npy` (uint16 or int32 [N, max_len], right-padded with 0) and
`{split}_lengths.npy` (int32 [N]) instead of images, `vocab.txt` (line i = the word of id i) and, when
prepared with GloVe, `embeddings.npy` (float32 [vocabulary, glove_dim]); see text.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from scpl_kit.config import ConfigError
from scpl_kit.data.sources import SOURCES, RawData
from scpl_kit.data.text import UNK, RawText, build_vocabulary, clean, encode, read_glove

SPLITS = ("train", "val", "test")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stratified_splits(raw: RawData, val_fraction: float, test_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Deterministic stratified splits. An official test split is kept as is; otherwise one is cut."""
    test = None if raw.test_images is None else (raw.test_images, raw.test_labels)
    return split_arrays(raw.images, raw.labels, test, val_fraction, test_fraction, seed)


def split_arrays(
    items: np.ndarray, labels: np.ndarray, test: tuple[np.ndarray, np.ndarray] | None, val_fraction: float,
    test_fraction: float, seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`stratified_splits` of any array of items (images, or the indices of text documents)."""
    from sklearn.model_selection import train_test_split  # only when preparing: training never pays its import

    if test is not None:
        remaining = 1.0
    else:
        items, test_x, labels, test_y = train_test_split(items, labels, test_size=test_fraction, stratify=labels, random_state=seed)
        test, remaining = (test_x, test_y), 1.0 - test_fraction
    # val_fraction is a fraction of the whole dataset, hence of what is left after the test cut.
    train_x, val_x, train_y, val_y = train_test_split(
        items, labels, test_size=val_fraction / remaining, stratify=labels, random_state=seed
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
    out = Path(processed_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(raw, RawText):
        return prepare_text(name, raw, out, val_fraction, test_fraction, split_seed)
    splits = stratified_splits(raw, val_fraction, test_fraction, split_seed)
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


def save(out: Path, arrays: dict[str, np.ndarray], checksums: dict[str, str]) -> None:
    for file, array in arrays.items():
        np.save(out / file, array)
        checksums[file] = sha256(out / file)


def clean_all(texts: list[str], labels: np.ndarray, policy: str, where: str) -> tuple[list[list[str]], np.ndarray, int]:
    """The words of every document and their labels, the empty ones handled by `policy` (data.empty_documents):
    error, drop (what the released code does), or unk (kept as one unknown token); and how many were empty."""
    documents = [clean(text) for text in texts]
    blank = [i for i, words in enumerate(documents) if not words]
    if blank and policy == "error":
        raise ConfigError(
            f"{where} {blank[0]} is empty after preprocessing ({len(blank)} such, e.g. made only of stop-words: "
            f"{texts[blank[0]][:80]!r}); set data.empty_documents=drop to leave them out or data.empty_documents=unk "
            f"to keep each as one unknown token"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if policy == "drop" and blank:
        keep = np.ones(len(documents), dtype=bool)
        keep[blank] = False
        return [words for words, kept in zip(documents, keep) if kept], labels[keep], len(blank)
    return documents, labels, len(blank)


def prepare_text(name: str, raw: RawText, out: Path, val_fraction: float, test_fraction: float, split_seed: int) -> Path:
    """Split the documents (stratified, as images), then tokenise, build the vocabulary on the training
    split only (the released IMDB code built it before splitting: test words leaked in) and save."""
    options = raw.options
    documents, labels, empty = clean_all(raw.texts, raw.labels, options["empty_documents"], f"{raw.source}: document")
    pools = {"train": documents, "val": documents, "test": documents}
    test = None
    if raw.test_texts is not None:
        pools["test"], test_labels, test_empty = clean_all(raw.test_texts, raw.test_labels, options["empty_documents"], f"{raw.source}: test document")
        test, empty = (np.arange(len(pools["test"])), test_labels), empty + test_empty
    # Split indices, not words: the same stratified cut as images get from the same labels and seed.
    index = split_arrays(np.arange(len(documents)), labels, test, val_fraction, test_fraction, split_seed)
    words = {split: [pools[split][i] for i in rows] for split, (rows, _) in index.items()}
    vocabulary = build_vocabulary(words["train"], options["vocab_size"])
    (out / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    checksums = {"vocab.txt": sha256(out / "vocab.txt")}
    encoded = {split: encode(words[split], vocabulary, options["max_len"]) for split in index}
    for split, (tokens, lengths) in encoded.items():
        save(out, {f"{split}_tokens.npy": tokens, f"{split}_lengths.npy": lengths, f"{split}_labels.npy": np.asarray(index[split][1], dtype=np.int64)}, checksums)
    train_tokens, train_lengths = encoded["train"]
    coverage = None
    if options["glove"] is not None:
        rows, found = read_glove(Path(options["glove"]), vocabulary, options["glove_dim"])
        save(out, {"embeddings.npy": rows}, checksums)
        coverage = {"words_found": found, "words": len(vocabulary) - 2, "fraction": found / max(1, len(vocabulary) - 2)}
    meta: dict[str, Any] = {
        "dataset": name,
        "source": raw.source,
        "modality": "text",
        "classes": raw.classes,
        "num_classes": len(raw.classes),
        "input_shape": [options["max_len"]],
        "sizes": {split: int(len(split_labels)) for split, (_, split_labels) in index.items()},
        "val_fraction": val_fraction,
        "test_fraction": None if raw.test_texts is not None else test_fraction,
        "split_seed": split_seed,
        **options,
        "source_options": sorted(options),  # checked at training even where recorded as null (glove): see load_prepared
        "vocabulary_used": len(vocabulary),  # pad and unk included; < vocab_size when the training split has fewer words
        "train_unk_fraction": float((train_tokens == UNK).sum() / train_lengths.sum()),
        "glove_coverage": coverage,  # vocabulary words (pad, unk excluded) that the GloVe file has
        "empty_documents_found": empty,
        "sha256": checksums,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
