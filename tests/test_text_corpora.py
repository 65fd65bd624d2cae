"""The text readers on tiny files written in each dataset's real on-disk format; no network."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scpl_kit.data import textcorpora
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.textcorpora import read_agnews, read_dbpedia14, read_imdb, read_sst2


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network, whatever the machine's connectivity."""
    monkeypatch.setattr(textcorpora, "hub_reachable", lambda timeout=5.0: False)


def write_parquet(path: Path, columns: dict[str, pa.Array], class_names: list[str] | None = None) -> None:
    """A shard as the hub stores it: ClassLabel as int64, plus the features `datasets` records in the schema."""
    table = pa.table(columns)
    if class_names is not None:
        features = {name: {"dtype": str(col.type), "_type": "Value"} for name, col in columns.items() if name != "label"}
        features["label"] = {"names": class_names, "_type": "ClassLabel"}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def strings(*values: str) -> pa.Array:
    return pa.array(values, pa.string())


def ints(*values: int, type: pa.DataType = pa.int64()) -> pa.Array:
    return pa.array(values, type)


# --- HuggingFace Parquet (the hub's layouts, column names and types) -------------------------------------------------


def test_agnews_parquet(tmp_path: Path) -> None:
    names = ["World", "Sports", "Business", "Sci/Tech"]
    shards = tmp_path / "ag_news" / "data"
    write_parquet(shards / "train-00000-of-00001.parquet", {"text": strings("Wall St. Bears", "Goal!"), "label": ints(2, 1)}, names)
    write_parquet(shards / "test-00000-of-00001.parquet", {"text": strings("Mars probe"), "label": ints(3)}, names)
    raw = read_agnews(tmp_path, download=False)
    assert raw.texts == ["Wall St. Bears", "Goal!"] and raw.labels.tolist() == [2, 1] and raw.labels.dtype == np.int64
    assert raw.test_texts == ["Mars probe"] and raw.test_labels.tolist() == [3]
    assert raw.classes == names
    assert "fancyzhx/ag_news" in raw.source and "train-00000-of-00001.parquet" in raw.source


def test_dbpedia_parquet_uses_content_like_the_papers_code(tmp_path: Path) -> None:
    shards = tmp_path / "dbpedia_14" / "dbpedia_14"
    columns = {"label": ints(0, 13), "title": strings("Acme", "Dune"), "content": strings(" Acme is a firm.", " A novel.")}
    write_parquet(shards / "train-00000-of-00001.parquet", columns, list(textcorpora.DBPEDIA14.classes))
    write_parquet(shards / "test-00000-of-00001.parquet", {k: v[:1] for k, v in columns.items()})  # no metadata: fine too
    raw = read_dbpedia14(tmp_path, download=False)
    assert raw.texts == [" Acme is a firm.", " A novel."] and raw.labels.tolist() == [0, 13]
    assert raw.classes[0] == "Company" and raw.classes[13] == "WrittenWork" and len(raw.classes) == 14


def test_imdb_parquet_ignores_unsupervised(tmp_path: Path) -> None:
    shards = tmp_path / "imdb" / "plain_text"
    write_parquet(shards / "train-00000-of-00001.parquet", {"text": strings("bad<br />film", "great"), "label": ints(0, 1)}, ["neg", "pos"])
    write_parquet(shards / "test-00000-of-00001.parquet", {"text": strings("meh"), "label": ints(0)}, ["neg", "pos"])
    write_parquet(shards / "unsupervised-00000-of-00001.parquet", {"text": strings("?"), "label": ints(-1)}, ["neg", "pos"])
    raw = read_imdb(tmp_path, download=False)
    assert raw.texts == ["bad<br />film", "great"] and raw.test_texts == ["meh"] and raw.classes == ["neg", "pos"]


def test_sst2_parquet_validation_is_the_test_split(tmp_path: Path) -> None:
    names = ["negative", "positive"]
    shards = tmp_path / "sst2" / "data"

    def shard(split: str, sentences: tuple[str, ...], labels: tuple[int, ...]) -> None:
        idx = ints(*range(len(labels)), type=pa.int32())
        write_parquet(shards / f"{split}-00000-of-00001.parquet", {"idx": idx, "sentence": strings(*sentences), "label": ints(*labels)}, names)

    shard("train", ("hide new secretions ", "a gorgeous film "), (0, 1))
    shard("validation", ("it 's a charming journey . ",), (1,))
    shard("test", ("unlabelled ",), (-1,))  # GLUE hides the test labels
    raw = read_sst2(tmp_path, download=False)
    assert raw.labels.tolist() == [0, 1] and raw.test_texts == ["it 's a charming journey . "] and raw.test_labels.tolist() == [1]


def test_auto_converted_layout_and_several_shards(tmp_path: Path) -> None:
    shards = tmp_path / "ag_news" / "default"
    write_parquet(shards / "train" / "0000.parquet", {"text": strings("a"), "label": ints(0)})
    write_parquet(shards / "train" / "0001.parquet", {"text": strings("b"), "label": ints(1)})
    write_parquet(shards / "test" / "0000.parquet", {"text": strings("c"), "label": ints(2)})
    raw = read_agnews(tmp_path, download=False)
    assert raw.texts == ["a", "b"] and raw.test_texts == ["c"]


# --- the original releases --------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)


def test_agnews_csv_joins_title_and_description(tmp_path: Path) -> None:
    folder = tmp_path / "ag_news_csv"
    write_csv(folder / "train.csv", [["3", "Wall St. Bears Claw Back", 'Reuters - Short-sellers, "ultra-cynics"'], ["1", "Talks", "Peace"]])
    write_csv(folder / "test.csv", [["4", "Mars", "A probe"]])
    raw = read_agnews(tmp_path, download=False)
    assert raw.texts == ['Wall St. Bears Claw Back Reuters - Short-sellers, "ultra-cynics"', "Talks Peace"]
    assert raw.labels.tolist() == [2, 0] and raw.test_labels.tolist() == [3] and raw.test_texts == ["Mars A probe"]
    assert "ag_news_csv" in raw.source


def test_dbpedia_csv(tmp_path: Path) -> None:
    folder = tmp_path / "dbpedia_csv"
    write_csv(folder / "train.csv", [["1", "E. D. Abbott Ltd", " Abbott of Farnham was a coachbuilder."], ["14", "Dune", " A novel."]])
    write_csv(folder / "test.csv", [["9", "Kwale", " A village."]])
    raw = read_dbpedia14(tmp_path, download=False)
    assert raw.texts == [" Abbott of Farnham was a coachbuilder.", " A novel."] and raw.labels.tolist() == [0, 13]
    assert raw.test_labels.tolist() == [8] and raw.classes[8] == "Village"


def test_imdb_aclimdb_tree(tmp_path: Path) -> None:
    root = tmp_path / "aclImdb"
    for split, name, file, text in [
        ("train", "neg", "0_3.txt", "Awful.<br /><br />Really."), ("train", "pos", "0_9.txt", "Loved it"),
        ("train", "pos", "1_10.txt", "Superb"), ("test", "neg", "0_2.txt", "Dull"), ("test", "pos", "0_10.txt", "Fine"),
        ("train", "unsup", "0_0.txt", "unlabelled"),
    ]:
        (root / split / name).mkdir(parents=True, exist_ok=True)
        (root / split / name / file).write_text(text, encoding="utf-8")
    (root / "train" / "labeledBow.feat").write_text("", encoding="utf-8")
    raw = read_imdb(tmp_path, download=False)
    assert raw.texts == ["Awful.<br /><br />Really.", "Loved it", "Superb"] and raw.labels.tolist() == [0, 1, 1]
    assert raw.test_texts == ["Dull", "Fine"] and raw.test_labels.tolist() == [0, 1]


def test_sst2_glue_tsv(tmp_path: Path) -> None:
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_text('sentence\tlabel\nhide new secretions \t0\n"the rock " is destined \t1\n', encoding="utf-8")
    (folder / "dev.tsv").write_text("sentence\tlabel\nit 's a charming journey . \t1\n", encoding="utf-8")
    (folder / "test.tsv").write_text("index\tsentence\n0\tuncharacteristically inept \n", encoding="utf-8")
    raw = read_sst2(tmp_path, download=False)
    assert raw.texts == ["hide new secretions ", '"the rock " is destined '] and raw.labels.tolist() == [0, 1]
    assert raw.test_texts == ["it 's a charming journey . "] and raw.test_labels.tolist() == [1]
    assert raw.classes == ["negative", "positive"] and "dev.tsv" in raw.source


# --- errors -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader, repo, folder", [
    (read_agnews, "fancyzhx/ag_news", "ag_news"), (read_dbpedia14, "fancyzhx/dbpedia_14", "dbpedia_14"),
    (read_imdb, "stanfordnlp/imdb", "imdb"), (read_sst2, "stanfordnlp/sst2", "sst2"),
])
def test_not_found_says_how_to_get_it(tmp_path: Path, reader, repo: str, folder: str) -> None:
    with pytest.raises(DatasetNotFoundError) as error:
        reader(tmp_path, download=True)  # the hub is unreachable (fixture): fails at once, with the reason
    message = str(error.value)
    assert f"hf download {repo} --repo-type dataset --local-dir {tmp_path / folder}" in message
    assert "curl -L" in message and "https://" in message and "SCPL_DATA_DIR" in message and "cannot be reached" in message


def test_missing_custom_raw_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="not a folder"):
        read_agnews(tmp_path / "typo", download=True)


def test_bad_parquet_label_names_file_and_row(tmp_path: Path) -> None:
    shards = tmp_path / "imdb" / "plain_text"
    write_parquet(shards / "train-00000-of-00001.parquet", {"text": strings("a", "b"), "label": ints(1, 2)})
    write_parquet(shards / "test-00000-of-00001.parquet", {"text": strings("c"), "label": ints(0)})
    with pytest.raises(CorruptDataError, match=r"train-00000-of-00001\.parquet row 1 .*label 2"):
        read_imdb(tmp_path, download=False)


def test_bad_csv_label_names_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "ag_news_csv"
    write_csv(folder / "train.csv", [["1", "t", "d"], ["5", "t", "d"]])
    write_csv(folder / "test.csv", [["1", "t", "d"]])
    with pytest.raises(CorruptDataError, match=r"ag_news_csv/train\.csv line 2: label '5'"):
        read_agnews(tmp_path, download=False)


def test_bad_tsv_label_names_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\nfine \t1\n", encoding="utf-8")
    (folder / "dev.tsv").write_text("sentence\tlabel\nhidden \t-1\n", encoding="utf-8")
    with pytest.raises(CorruptDataError, match=r"dev\.tsv line 2: label '-1'"):
        read_sst2(tmp_path, download=False)


def test_wrong_class_names_or_columns(tmp_path: Path) -> None:
    shards = tmp_path / "sst2" / "data"
    write_parquet(shards / "train-00000-of-00001.parquet", {"sentence": strings("x"), "label": ints(0)}, ["pos", "neg"])
    write_parquet(shards / "validation-00000-of-00001.parquet", {"text": strings("y"), "label": ints(0)})
    with pytest.raises(CorruptDataError, match="names its classes"):
        read_sst2(tmp_path, download=False)
    write_parquet(shards / "train-00000-of-00001.parquet", {"sentence": strings("x"), "label": ints(0)})
    with pytest.raises(CorruptDataError, match=r"validation-00000-of-00001\.parquet lacks the column\(s\) sentence"):
        read_sst2(tmp_path, download=False)


def test_incomplete_copies(tmp_path: Path) -> None:
    write_parquet(tmp_path / "ag_news" / "data" / "train-00000-of-00001.parquet", {"text": strings("a"), "label": ints(0)})
    with pytest.raises(DatasetNotFoundError, match=r"(?s)incomplete: data/test-\*\.parquet is missing.*hf download"):
        read_agnews(tmp_path, download=False)
    (tmp_path / "aclImdb" / "train" / "neg").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"aclImdb is incomplete: train/neg/\*\.txt"):
        read_imdb(tmp_path, download=False)


def test_download_saves_the_hub_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True: load_dataset's splits are saved as the hub's Parquet shards, then read like a local copy."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    fake = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
        for split, texts, labels in [("train", ["good", "bad"], [1, 0]), ("test", ["ok"], [1]), ("unsupervised", ["?"], [-1])]
    })
    asked: list[str] = []
    monkeypatch.setattr(textcorpora, "hub_reachable", lambda timeout=5.0: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, *a, **k: asked.append(repo) or fake)
    raw = read_imdb(tmp_path, download=True)
    assert asked == ["stanfordnlp/imdb"] and raw.texts == ["good", "bad"] and raw.test_labels.tolist() == [1]
    assert "load_dataset('stanfordnlp/imdb')" in raw.source
    assert sorted(p.name for p in (tmp_path / "imdb" / "plain_text").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet",
    ]
    assert read_imdb(tmp_path, download=False).texts == ["good", "bad"]  # offline from now on
