"""The SCPL paper's text datasets, read from the formats they are published in.

Each reader looks, in this order, for
1. the HuggingFace hub's Parquet shards under `raw_dir/<folder>/` (what `hf download <repo> --repo-type dataset
   --local-dir raw_dir/<folder>` writes: `<config>/<split>-0000i-of-0000n.parquet`; the hub's auto-converted
   layout `<config>/<split>/0000.parquet` is accepted too), then
2. the original release unpacked under `raw_dir` (Zhang et al. 2015 CSVs, Stanford's aclImdb tree, GLUE's SST-2 TSVs),
3. else, when `download` is true, `datasets.load_dataset(<repo>)`, saved as the hub's Parquet layout (so the next run
   is offline), and otherwise a DatasetNotFoundError that says how to get the data.

Texts come back raw (preprocessing is text.py's job). Splits: the official train split, and as test split the official
test split, except SST-2, whose GLUE test labels are hidden (-1): its validation split is the test split, as in the
paper's code. IMDB's `unsupervised` split is ignored. Text fields are joined with one space, as HuggingFace builds
AG News' `text` from the CSV's title and description; DBpedia uses its `content` only, as the paper's code did.
"""

from __future__ import annotations

import csv
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np

from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.sources import DEFAULT_RAW_DIR
from scpl_kit.data.text import RawText, register_text_dataset

Split = tuple[list[str], np.ndarray]  # texts, int64 labels
Found = tuple[Split, Split, str]  # train, test, what was read


@dataclass(frozen=True)
class Corpus:
    name: str  # the registered name
    repo: str  # HuggingFace hub id
    folder: str  # raw_dir/<folder>: the hub copy (the --local-dir of `hf download`)
    config: str  # the hub repo's folder that holds the Parquet shards
    columns: tuple[str, ...]  # Parquet text columns, joined with a space
    classes: tuple[str, ...]  # label i is classes[i], as in the hub's ClassLabel
    test_split: str  # hub split used as the test split
    original: str  # raw_dir/<original>: the unpacked original release
    original_files: str  # what a complete original copy holds (for messages)
    original_get: str  # shell command that gets the original release into {raw_dir}


AGNEWS = Corpus(
    "agnews", "fancyzhx/ag_news", "ag_news", "data", ("text",), ("World", "Sports", "Business", "Sci/Tech"), "test",
    "ag_news_csv", "train.csv and test.csv",
    # fast.ai's mirror of Zhang et al.'s release (the original Google Drive folder needs a browser).
    "mkdir -p {raw_dir} && curl -L https://s3.amazonaws.com/fast-ai-nlp/ag_news_csv.tgz | tar xz -C {raw_dir}",
)
DBPEDIA14 = Corpus(
    "dbpedia14", "fancyzhx/dbpedia_14", "dbpedia_14", "dbpedia_14",
    # The paper's code feeds `content` only (no title); most contents start with the entity's name anyway.
    ("content",),
    ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation", "Building",
     "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork"),
    "test", "dbpedia_csv", "train.csv and test.csv",
    "mkdir -p {raw_dir} && curl -L https://s3.amazonaws.com/fast-ai-nlp/dbpedia_csv.tgz | tar xz -C {raw_dir}",
)
IMDB = Corpus(
    "imdb", "stanfordnlp/imdb", "imdb", "plain_text", ("text",), ("neg", "pos"), "test",
    "aclImdb", "train/{neg,pos}/*.txt and test/{neg,pos}/*.txt",
    "mkdir -p {raw_dir} && curl -L https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz | tar xz -C {raw_dir}",
)
SST2 = Corpus(
    "sst2", "stanfordnlp/sst2", "sst2", "data", ("sentence",), ("negative", "positive"), "validation",
    "SST-2", "train.tsv and dev.tsv",
    "mkdir -p {raw_dir} && curl -L -o {raw_dir}/SST-2.zip https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
    " && unzip -q {raw_dir}/SST-2.zip -d {raw_dir}",
)


def read_corpus(corpus: Corpus, raw_dir: Path, download: bool, read_original: Callable[[Path], Found | None]) -> RawText:
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir() and raw_dir != DEFAULT_RAW_DIR:  # the rule of sources.fetch: only the kit's own is created
        raise DatasetNotFoundError(
            f"data.raw_dir={raw_dir} (from SCPL_DATA_DIR or the config) is not a folder: point it at the folder that "
            f"holds {corpus.folder}/ or {corpus.original}/, or unset it to download into {DEFAULT_RAW_DIR}/"
        )
    hub = raw_dir / corpus.folder
    found = read_hub_copy(hub, corpus) or read_original(raw_dir / corpus.original)
    why = "data.download is false"
    if found is None and download:
        why = download_hub_copy(hub, corpus)
        if not why:
            found = read_hub_copy(hub, corpus)
            if found is not None:
                found = (found[0], found[1], f"datasets.load_dataset({corpus.repo!r}) saved as {found[2]}")
    if found is None:
        raise not_found(raw_dir, corpus, why)
    (texts, labels), (test_texts, test_labels), source = found
    return RawText(texts, labels, list(corpus.classes), test_texts, test_labels, source=source)


def get_commands(raw_dir: Path, corpus: Corpus) -> str:
    return (
        f"Get it with: hf download {corpus.repo} --repo-type dataset --local-dir {raw_dir / corpus.folder}\n"
        f"  (pip install huggingface_hub; older huggingface_hub releases call it `huggingface-cli download`)\n"
        f"or get the original release with: {corpus.original_get.format(raw_dir=raw_dir)}"
    )


def not_found(raw_dir: Path, corpus: Corpus, why: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{corpus.name} not found: {raw_dir} holds neither the HuggingFace copy ({raw_dir / corpus.folder}/ with "
        f"{corpus.config}/train-*.parquet and {corpus.config}/{corpus.test_split}-*.parquet) nor the original release "
        f"({raw_dir / corpus.original}/ with {corpus.original_files}); not downloaded: {why}.\n"
        f"{get_commands(raw_dir, corpus)}\n"
        f"or point data.raw_dir (or the SCPL_DATA_DIR environment variable) at a folder that holds "
        f"{corpus.folder}/ or {corpus.original}/."
    )


def incomplete(folder: Path, corpus: Corpus, missing: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"the {corpus.name} copy at {folder} is incomplete: {missing} is missing. Delete {folder}, then\n"
        f"{get_commands(folder.parent, corpus)}"
    )


def label_index(value: object, path: Path, where: str, corpus: Corpus, base: int = 0) -> int:
    """`value` as a 0-based class index; `base` is 1 for the Zhang et al. CSVs, whose classes count from 1."""
    try:
        index = int(value) - base  # type: ignore[arg-type]
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(corpus.classes) or isinstance(value, float):
        first, last = base, base + len(corpus.classes) - 1
        raise CorruptDataError(
            f"{path} {where}: label {value!r} is not a class of {corpus.name} (integers {first}..{last}: "
            f"{', '.join(corpus.classes)}); replace the file with a fresh copy"
        )
    return index


# --- 1. the HuggingFace hub's Parquet shards -------------------------------------------------------------------------


def split_files(folder: Path, split: str) -> list[Path]:
    """The shards of `split`: `<split>-*.parquet` (hub layout) or `<split>/*.parquet` (auto-converted layout)."""
    files = sorted(
        p for p in folder.rglob("*.parquet")
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)  # hf download's .cache/
        and (p.name.startswith(f"{split}-") or p.parent.name == split)
    )
    if len({p.parent for p in files}) > 1:  # two copies side by side would silently double the data
        raise CorruptDataError(
            f"{folder} holds {split} shards in several folders ({', '.join(str(p) for p in files)}): keep one copy"
        )
    return files


def read_hub_copy(folder: Path, corpus: Corpus) -> Found | None:
    if not folder.is_dir():
        return None
    train, test = split_files(folder, "train"), split_files(folder, corpus.test_split)
    if not train and not test:
        return None
    for files, split in ((train, "train"), (test, corpus.test_split)):
        if not files:
            raise incomplete(folder, corpus, f"{corpus.config}/{split}-*.parquet")
    source = f"{folder} ({corpus.repo} Parquet: {', '.join(str(p.relative_to(folder)) for p in train + test)})"
    return read_parquet(train, corpus), read_parquet(test, corpus), source


def read_parquet(files: list[Path], corpus: Corpus) -> Split:
    import pyarrow.parquet as pq

    texts: list[str] = []
    labels: list[int] = []
    for path in files:
        schema = pq.read_schema(path)
        check_class_names(path, schema.metadata or {}, corpus)
        needed = [*corpus.columns, "label"]
        if missing := [c for c in needed if c not in schema.names]:
            raise CorruptDataError(
                f"{path} lacks the column(s) {', '.join(missing)} (it has {', '.join(schema.names)}): "
                f"is it a copy of {corpus.repo}?"
            )
        table = pq.read_table(path, columns=needed)
        columns = [table.column(c).to_pylist() for c in corpus.columns]
        for row, (*parts, label) in enumerate(zip(*columns, table.column("label").to_pylist())):
            if any(part is None for part in parts):
                raise CorruptDataError(f"{path} row {row} (0-based) has no text; replace the file with a fresh copy")
            texts.append(" ".join(parts))
            labels.append(label_index(label, path, f"row {row} (0-based)", corpus))
    return texts, np.asarray(labels, dtype=np.int64)


def check_class_names(path: Path, metadata: dict[bytes, bytes], corpus: Corpus) -> None:
    """Files written by `datasets` carry their features; their ClassLabel names must be ours, in our order."""
    try:
        names = json.loads(metadata[b"huggingface"])["info"]["features"]["label"]["names"]
    except (KeyError, TypeError, ValueError):
        return  # plain Parquet without the hub's metadata: nothing to check
    if list(names) != list(corpus.classes):
        raise CorruptDataError(
            f"{path} names its classes {names}, not {list(corpus.classes)}: is it a copy of {corpus.repo}?"
        )


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub answers at all: load_dataset retries for ~25 s on a closed network before giving up."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # only the proxy knows; let load_dataset try
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def download_hub_copy(folder: Path, corpus: Corpus) -> str:
    """Save the train and test splits from `load_dataset` in the hub's layout; the reason on failure, else ''."""
    if not hub_reachable():
        return "the HuggingFace hub cannot be reached (no network, or HF_HUB_OFFLINE is set)"
    try:
        import datasets

        loaded = datasets.load_dataset(corpus.repo)
        written = []
        for split in ("train", corpus.test_split):
            path = folder / corpus.config / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            loaded[split].to_parquet(str(path.with_suffix(".tmp")))
            written.append(path)
        for path in written:  # renamed only once both are complete, so a failure never leaves half a copy
            path.with_suffix(".tmp").replace(path)
    except Exception as error:  # any network, hub or disk failure ends in the advice of not_found
        return f"datasets.load_dataset({corpus.repo!r}) failed: {error}"
    return ""


# --- 2. the original releases ----------------------------------------------------------------------------------------


def read_zhang_csv(path: Path, corpus: Corpus, fields: tuple[int, ...]) -> Split:
    """Zhang et al. 2015: no header; class index (1-based), title, description/content; fields joined by a space."""
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            if len(row) != 3:
                raise CorruptDataError(
                    f"{path} line {reader.line_num}: expected 3 columns (class index, title, text), found {len(row)}"
                )
            labels.append(label_index(row[0], path, f"line {reader.line_num}", corpus, base=1))
            texts.append(" ".join(row[i] for i in fields))
    return texts, np.asarray(labels, dtype=np.int64)


def read_zhang(folder: Path, corpus: Corpus, fields: tuple[int, ...]) -> Found | None:
    if not folder.is_dir():
        return None
    for name in ("train.csv", "test.csv"):
        if not (folder / name).is_file():
            raise incomplete(folder, corpus, name)
    return (
        read_zhang_csv(folder / "train.csv", corpus, fields), read_zhang_csv(folder / "test.csv", corpus, fields),
        f"{folder} (original CSV release: train.csv, test.csv)",
    )


def read_glue_tsv(path: Path, corpus: Corpus) -> Split:
    """GLUE's SST-2: a `sentence<TAB>label` header, no quoting (sentences contain quote characters)."""
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not {"sentence", "label"} <= set(reader.fieldnames or ()):
            raise CorruptDataError(f"{path} has the header {reader.fieldnames}, not sentence<TAB>label: is it GLUE's SST-2?")
        for row in reader:
            labels.append(label_index(row["label"], path, f"line {reader.line_num}", corpus))
            texts.append(row["sentence"])
    return texts, np.asarray(labels, dtype=np.int64)


def read_sst2_tsv(folder: Path) -> Found | None:
    if not folder.is_dir():
        return None
    for name in ("train.tsv", "dev.tsv"):
        if not (folder / name).is_file():
            raise incomplete(folder, SST2, name)
    return (
        read_glue_tsv(folder / "train.tsv", SST2), read_glue_tsv(folder / "dev.tsv", SST2),
        f"{folder} (GLUE SST-2: train.tsv; dev.tsv as the test split)",
    )


def read_aclimdb(folder: Path) -> Found | None:
    """Stanford's aclImdb_v1: one review per <id>_<rating>.txt under {train,test}/{neg,pos}/; train/unsup is ignored."""
    if not folder.is_dir():
        return None
    splits = []
    for split in ("train", "test"):
        texts: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(IMDB.classes):
            files = sorted((folder / split / name).glob("*.txt"))
            if not files:
                raise incomplete(folder, IMDB, f"{split}/{name}/*.txt")
            texts += [p.read_text(encoding="utf-8") for p in files]
            labels += [label] * len(files)
        splits.append((texts, np.asarray(labels, dtype=np.int64)))
    return splits[0], splits[1], f"{folder} (aclImdb_v1: train/, test/)"


# --- the readers -----------------------------------------------------------------------------------------------------


def read_agnews(raw_dir: Path, download: bool = True) -> RawText:
    return read_corpus(AGNEWS, raw_dir, download, lambda folder: read_zhang(folder, AGNEWS, fields=(1, 2)))


def read_dbpedia14(raw_dir: Path, download: bool = True) -> RawText:
    return read_corpus(DBPEDIA14, raw_dir, download, lambda folder: read_zhang(folder, DBPEDIA14, fields=(2,)))


def read_imdb(raw_dir: Path, download: bool = True) -> RawText:
    return read_corpus(IMDB, raw_dir, download, read_aclimdb)


def read_sst2(raw_dir: Path, download: bool = True) -> RawText:
    return read_corpus(SST2, raw_dir, download, read_sst2_tsv)


# max_len: the paper's (README of github.com/minyaho/scpl). The decorator returns each reader unchanged.
register_text_dataset("agnews", 4, max_len=60)(read_agnews)
register_text_dataset("dbpedia14", 14, max_len=400)(read_dbpedia14)
register_text_dataset("imdb", 2, max_len=350)(read_imdb)
register_text_dataset("sst2", 2, max_len=15)(read_sst2)
