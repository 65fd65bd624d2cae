"""Tiny-ImageNet: 200 ImageNet classes of 64×64 JPEGs, decoded once at 32×32 (as in the SCPL paper) or 64×64.

The official validation set (labelled by val/val_annotations.txt) is the test split, as in the paper's
code; the official test images are unlabelled and ignored. The validation split is cut from train.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from scpl_kit.config import ConfigError
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.facts import DatasetFacts
from scpl_kit.data.sources import RawData, fetch, register_dataset

FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
IMAGE_SIZES = (32, 64)
CONTENTS = "wnids.txt, words.txt, train/<wnid>/images/*.JPEG for every wnid, val/images/ and val/val_annotations.txt"
CHUNK = 500  # validation images per progress step: as many as one class folder of the training set


def check_image_size(image_size: int) -> int:
    if image_size not in IMAGE_SIZES:
        raise ConfigError(
            f"data.image_size={image_size!r} is not a Tiny-ImageNet size; valid sizes: 32 (as in the SCPL paper) or 64 (native)"
        )
    return int(image_size)


def tinyimagenet_facts(*, image_size: int = 32) -> DatasetFacts:
    size = check_image_size(image_size)
    return DatasetFacts((3, size, size), 200)


def get_command(raw_dir: Path) -> str:
    archive = raw_dir / "tiny-imagenet-200.zip"
    return f"mkdir -p {raw_dir} && curl -L -o {archive} {URL} && unzip -q {archive} -d {raw_dir}"


def incomplete(folder: Path, missing: str, problem: str = "is missing") -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"the tinyimagenet copy at {folder} is incomplete: {missing} {problem} (a complete copy holds {CONTENTS}); "
        f"delete it and get it again with: {get_command(folder.parent)}"
    )


@register_dataset("tinyimagenet", tinyimagenet_facts)
def load_tinyimagenet(raw_dir: Path, download: bool = True, *, image_size: int = 32) -> RawData:
    size = check_image_size(image_size)
    raw_dir = Path(raw_dir)
    folder = fetch("tinyimagenet", raw_dir, FOLDER, URL, MD5, download)
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"tinyimagenet not found: {folder} does not exist.\n"
            f"Get it with: {get_command(raw_dir)}\n"
            f"or point data.raw_dir (or the SCPL_DATA_DIR environment variable) at a folder that holds {FOLDER}/ "
            f"(the zip from {URL}, unpacked)."
        )
    wnids, classes = read_classes(folder)
    per_class = [train_files(folder, wnid) for wnid in wnids]
    test_paths, test_labels = read_val_annotations(folder, wnids)
    images = decode_all(per_class, size, "tinyimagenet train")
    test_images = decode_all([test_paths[i : i + CHUNK] for i in range(0, len(test_paths), CHUNK)], size, "tinyimagenet val")
    labels = np.repeat(np.arange(len(wnids), dtype=np.int64), [len(job) for job in per_class])
    return RawData(images, labels, classes, test_images, np.asarray(test_labels, dtype=np.int64), source=str(folder))


def read_classes(folder: Path) -> tuple[list[str], list[str]]:
    """The wnids, sorted as torchvision's ImageFolder (the paper's code) orders the class folders, and
    their names "<wnid> <first synonym from words.txt>"."""
    for name in ("wnids.txt", "words.txt"):
        if not (folder / name).is_file():
            raise incomplete(folder, name)
    wnids = sorted((folder / "wnids.txt").read_text().split())
    words = dict(line.split("\t", 1) for line in (folder / "words.txt").read_text().splitlines() if "\t" in line)
    return wnids, [f"{wnid} {words.get(wnid, '').split(',')[0].strip()}".strip() for wnid in wnids]


def is_jpeg(name: str) -> bool:
    return name.lower().endswith((".jpeg", ".jpg"))


def train_files(folder: Path, wnid: str) -> list[str]:
    images = folder / "train" / wnid / "images"
    files = sorted(name for name in os.listdir(images) if is_jpeg(name)) if images.is_dir() else []
    if not files:
        raise incomplete(folder, f"train/{wnid}/images/*.JPEG")
    return [str(images / name) for name in files]


def read_val_annotations(folder: Path, wnids: list[str]) -> tuple[list[str], list[int]]:
    """Test files and labels in the order of val/val_annotations.txt (filename, wnid, box, tab-separated)."""
    annotations, images = folder / "val" / "val_annotations.txt", folder / "val" / "images"
    if not annotations.is_file():
        raise incomplete(folder, "val/val_annotations.txt")
    present = set(os.listdir(images)) if images.is_dir() else set()
    label = {wnid: i for i, wnid in enumerate(wnids)}
    paths, labels = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        file, wnid = (line.split("\t") + [""])[:2]
        if wnid not in label:
            raise CorruptDataError(
                f"{annotations} line {number} names class {wnid!r}, which is not in wnids.txt; get a fresh copy with: {get_command(folder.parent)}"
            )
        if file not in present:
            raise incomplete(folder, f"val/images/{file}")
        paths.append(str(images / file))
        labels.append(label[wnid])
    if not paths:
        raise incomplete(folder, "val/val_annotations.txt", "is empty")
    return paths, labels


def decode(path: str, size: int) -> np.ndarray:
    """One image as uint8 [3, size, size]."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # a few Tiny-ImageNet JPEGs are grayscale
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise CorruptDataError(f"{path} cannot be decoded ({error}); replace it from a fresh copy of {URL}") from None
    # BILINEAR is what torchvision's Resize(32) applies to PIL images, i.e. what the paper's code did;
    # Pillow widens the filter when shrinking, so this is antialiased (64 → 32 weighs 4×4 neighbourhoods).
    # A 64×64 image asked for at 64 comes back unchanged.
    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def decode_files(paths: list[str], size: int) -> np.ndarray:
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = decode(path, size)
    return out


def decode_all(jobs: list[list[str]], size: int, desc: str) -> np.ndarray:
    """Decode lists of JPEGs, in order, into one preallocated uint8 array (no float copy, no concatenation).

    One process: Pillow decodes and resizes a 64×64 JPEG in ~0.2 ms (all 110k in ~20 s plus file reads);
    a process pool would save seconds at the price of spawn's start-up and its `__main__`-guard rule."""
    out = np.empty((sum(len(job) for job in jobs), 3, size, size), dtype=np.uint8)
    with tqdm(total=len(out), desc=desc, unit="img") as bar:
        start = 0
        for job in jobs:
            out[start : start + len(job)] = decode_files(job, size)
            start += len(job)
            bar.update(len(job))
    return out
