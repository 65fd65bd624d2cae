"""Synthetic data shaped as the paper's speed tables feed their models: random CIFAR-10-shaped images
and random AG-News-shaped documents. A step's time depends on shapes, not values, so throughput and
memory can be measured through the normal config path (`data=synthetic_cifar10`) without a download.
Nothing learns from them: the labels are random.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scpl_kit.data.facts import DatasetFacts
from scpl_kit.data.sources import RawData, register_dataset
from scpl_kit.data.text import RawText, register_text_dataset

SEED = 0  # fixed: prepared twice, the data is the same bytes (DVC hashes it)
CIFAR_SHAPE, CIFAR_CLASSES = (3, 32, 32), 10
# AG News as the paper's speed tables use it: 4 classes, 60 tokens per document, a 30,000-word vocabulary.
AGNEWS_CLASSES, AGNEWS_TOKENS, AGNEWS_WORDS = 4, 60, 30_000
DOCUMENTS = 1_800  # enough for 11 batches of 128 in the training split (conf/data/synthetic_agnews.yaml's fractions)


def cifar10_facts(*, samples: int = 1_800) -> DatasetFacts:
    return DatasetFacts(CIFAR_SHAPE, CIFAR_CLASSES)


@register_dataset("synthetic_cifar10", cifar10_facts)
def load_synthetic_cifar10(raw_dir: Path, download: bool = False, *, samples: int = 1_800) -> RawData:
    """`samples` uniformly random 3×32×32 images with random labels of 10 classes."""
    if samples < CIFAR_CLASSES:
        raise ValueError(f"data.samples={samples}: at least one image per class ({CIFAR_CLASSES}) is needed for stratified splits")
    rng = np.random.default_rng(SEED)
    images = rng.integers(0, 256, (samples, *CIFAR_SHAPE), dtype=np.uint8)
    labels = np.arange(samples, dtype=np.int64) % CIFAR_CLASSES  # balanced, so every split has every class
    return RawData(images, rng.permutation(labels), [f"class{c}" for c in range(CIFAR_CLASSES)], source=f"synthetic (numpy seed {SEED})")


@register_text_dataset("synthetic_agnews", num_classes=AGNEWS_CLASSES, max_len=AGNEWS_TOKENS)
def read_synthetic_agnews(raw_dir: Path, download: bool) -> RawText:
    """Documents of AG-News length (60 words after preprocessing) of 30,000 made-up words, each word
    used 3 or 4 times in a random order, so the training split's vocabulary fills up (30,000 ids, as
    AG News's: the embedding and its Adam step are full size); raw_dir and download are unused."""
    rng = np.random.default_rng(SEED)
    words = rng.permutation(np.arange(DOCUMENTS * AGNEWS_TOKENS) % AGNEWS_WORDS).reshape(DOCUMENTS, AGNEWS_TOKENS)
    texts = [" ".join(f"w{w}" for w in row) for row in words]
    labels = rng.permutation(np.arange(DOCUMENTS, dtype=np.int64) % AGNEWS_CLASSES)
    return RawText(texts, labels, [f"class{c}" for c in range(AGNEWS_CLASSES)], source=f"synthetic (numpy seed {SEED})")
