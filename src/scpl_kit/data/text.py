"""Text datasets: raw documents → the paper's preprocessing → token ids on disk (see methods.md §4).

A text source is a reader `read(raw_dir, download) -> RawText` registered with
`register_text_dataset(name, num_classes, max_len=...)`; the registration turns it into a loader whose
keyword-only parameters are the preprocessing options (max_len, vocab_size, ...), so `prepare` passes
them from the data config, records them in meta.json, and training refuses data prepared with others,
exactly as for an image source's options.

Preprocessing follows the SCPL authors' released code (github.com/minyaho/scpl, utils/nlp.py:
`data_preprocessing`, `create_vocab`, `Textset`, `get_word_vector`), in its order: lower-case, delete
HTML tags (`<.*?>`, not across lines), delete ASCII punctuation (`string.punctuation`: "don't" becomes
"dont", "U.S." becomes "us"), split on whitespace, drop NLTK's English stop-words (compared after the
punctuation is gone, so the list's "don't" never matches, as in the released code), keep the first
max_len words. Vocabulary: 0 pad, 1 unk, then the vocab_size - 2 most frequent words of the *training*
documents (whole, before truncation, as released).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from scpl_kit.config import ConfigError
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.facts import DatasetFacts
from scpl_kit.data.sources import register_dataset

PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>")  # vocab.txt's first two lines; no cleaned word can be either (< and > are punctuation)
EMPTY_DOCUMENTS = ("error", "drop", "unk")
GLOVE_URL = "https://nlp.stanford.edu/data/glove.6B.zip"
HTML_TAG = re.compile("<.*?>")  # the released pattern: '.' stops at a newline, so a tag never spans lines
NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
STOP_WORDS = frozenset(
    line for line in (Path(__file__).with_name("stopwords_english.txt")).read_text().split("\n") if line and not line.startswith("#")
)


@dataclass
class RawText:
    texts: list[str]
    labels: np.ndarray  # int64 [N], indices into `classes`
    classes: list[str]
    test_texts: list[str] | None = None  # an official test split, when the dataset has one
    test_labels: np.ndarray | None = None
    source: str = ""  # where the documents came from (a folder, a file, a hub id), recorded in meta.json
    options: dict[str, Any] = field(default_factory=dict)  # the preprocessing options it is to be prepared with


TextReader = Callable[[Path, bool], RawText]  # (raw_dir, download) -> RawText


def clean(text: str) -> list[str]:
    """One document's words after the paper's preprocessing (before truncation)."""
    text = HTML_TAG.sub("", text.lower()).translate(NO_PUNCTUATION)
    return [word for word in text.split() if word not in STOP_WORDS]


def build_vocabulary(documents: Iterable[Sequence[str]], vocab_size: int) -> list[str]:
    """Word of id i at position i: pad, unk, then the most frequent words, ties in alphabetical order
    (released: first occurrence, which would make the ids depend on the order of the split)."""
    counts = Counter(word for document in documents for word in document)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [*SPECIALS, *(word for word, _ in ranked[: vocab_size - len(SPECIALS)])]


def encode(documents: Sequence[Sequence[str]], vocabulary: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [N, max_len] right-padded with 0 (uint16 when every id fits, else int32) and lengths [N]."""
    ids = {word: i for i, word in enumerate(vocabulary)}
    dtype = np.uint16 if len(vocabulary) <= np.iinfo(np.uint16).max + 1 else np.int32
    tokens = np.zeros((len(documents), max_len), dtype=dtype)
    lengths = np.zeros(len(documents), dtype=np.int32)
    for row, document in enumerate(documents):
        kept = [ids.get(word, UNK) for word in document[:max_len]] or [UNK]  # an empty document kept as one unk
        tokens[row, : len(kept)] = kept
        lengths[row] = len(kept)
    return tokens, lengths


def read_glove(path: Path, vocabulary: Sequence[str], dim: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Rows of GloVe's text format (`word v1 … v_dim` per line) for the vocabulary, and how many words it had.

    Words GloVe lacks (and unk) start from small random vectors, N(0, σ²) with σ the found vectors' own
    standard deviation, drawn from a fixed seed so prepared files reproduce: random rather than zeros so
    distinct unknown words do not all start as the same vector (the released code draws U[0, 1)). The
    pad row is zero. Every line is checked for `dim` numbers; only the vocabulary's lines are parsed."""
    wanted = {word: i for i, word in enumerate(vocabulary) if i >= len(SPECIALS)}
    rows = np.zeros((len(vocabulary), dim), dtype=np.float32)
    found = np.zeros(len(vocabulary), dtype=bool)
    # errors="replace": a stray byte only spoils its own word, which then matches no vocabulary word.
    with open(path, encoding="utf-8", errors="replace", newline="\n") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip()
            if not line:
                continue
            if line.count(" ") != dim:  # one space before each number: cheap on GloVe's 400,000 lines
                raise ConfigError(
                    f"{path} line {number} has {line.count(' ')} numbers after its word, not data.glove_dim={dim}: "
                    f"set data.glove_dim to the size of this file's vectors (glove.6B.<dim>d.txt) or give another data.glove"
                )
            word, _, numbers = line.partition(" ")
            i = wanted.get(word)
            if i is None or found[i]:  # a word listed twice keeps its first vector
                continue
            try:
                rows[i] = np.array(numbers.split(" "), dtype=np.float32)
            except ValueError as error:
                raise CorruptDataError(f"{path} line {number} is not `word v1 … v{dim}` ({error}); get GloVe again from {GLOVE_URL}") from None
            found[i] = True
    missing = ~found
    missing[PAD] = False
    scale = float(rows[found].std()) if found.any() else 1.0 / np.sqrt(dim)
    rows[missing] = np.random.default_rng(seed).normal(0.0, scale, (int(missing.sum()), dim))
    return rows, int(found.sum())


def check_options(max_len: int, vocab_size: int, glove: str | Path | None, glove_dim: int, empty_documents: str) -> dict[str, Any]:
    """The preprocessing options as meta.json records them; each bad one named by its config key."""
    for key, value, least in (("max_len", max_len, 1), ("vocab_size", vocab_size, len(SPECIALS) + 1), ("glove_dim", glove_dim, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"data.{key}={value!r} must be an integer ≥ {least}")
    if empty_documents not in EMPTY_DOCUMENTS:
        raise ConfigError(f"data.empty_documents={empty_documents!r}; valid values: {', '.join(EMPTY_DOCUMENTS)}")
    if glove is not None and not Path(glove).is_file():
        raise DatasetNotFoundError(
            f"data.glove={glove} is not a file: give the path of glove.6B.{glove_dim}d.txt (from {GLOVE_URL}, unzipped), "
            f"or data.glove=null to train the embedding from scratch"
        )
    return {"max_len": max_len, "vocab_size": vocab_size, "glove": None if glove is None else str(glove),
            "glove_dim": glove_dim, "empty_documents": empty_documents}


def check_raw(raw: RawText, name: str, num_classes: int) -> None:
    """A reader's output against the registration: class count, one label per text, labels in range."""
    if len(raw.classes) != num_classes:
        raise CorruptDataError(f"{name} from {raw.source} has {len(raw.classes)} classes ({', '.join(raw.classes)}), not {num_classes}")
    for which, texts, labels in (("", raw.texts, raw.labels), ("test ", raw.test_texts, raw.test_labels)):
        if texts is None:
            continue
        if labels is None or len(labels) != len(texts):
            raise CorruptDataError(f"{name} from {raw.source}: {len(texts)} {which}texts but {0 if labels is None else len(labels)} labels")
        outside = np.flatnonzero((np.asarray(labels) < 0) | (np.asarray(labels) >= num_classes))
        if len(outside):
            row = int(outside[0])
            raise CorruptDataError(
                f"{name} from {raw.source}: {which}document {row} has label {labels[row]}, outside the {num_classes} classes "
                f"0..{num_classes - 1} ({', '.join(raw.classes)})"
            )


def register_text_dataset(name: str, num_classes: int, max_len: int) -> Callable[[TextReader], TextReader]:
    """Register reader `read` as dataset `name` with the paper's preprocessing options; returns `read` unchanged.

    `max_len` is the dataset's default (the paper's, e.g. AG News 60). The facts take every option the
    loader takes (only max_len shapes them) because every source's facts and loader take the same ones."""

    def facts(*, max_len: int = max_len, vocab_size: int = 30000, glove: str | None = None, glove_dim: int = 300,
              empty_documents: str = "error") -> DatasetFacts:
        check_options(max_len, vocab_size, None, glove_dim, empty_documents)  # the glove file is checked when read
        return DatasetFacts((max_len,), num_classes, modality="text")

    def add(read: TextReader) -> TextReader:
        def load(raw_dir: Path, download: bool = False, *, max_len: int = max_len, vocab_size: int = 30000,
                 glove: str | None = None, glove_dim: int = 300, empty_documents: str = "error") -> RawText:
            options = check_options(max_len, vocab_size, glove, glove_dim, empty_documents)  # before a long read
            raw = read(Path(raw_dir), download)
            check_raw(raw, name, num_classes)
            raw.options = options
            return raw

        load.__doc__ = read.__doc__
        register_dataset(name, facts)(load)
        return read

    return add
