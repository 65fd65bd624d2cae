"""The tables' bookkeeping: which runs a grid names, and which published numbers sit beside which rows."""

import csv
from pathlib import Path

import pandas as pd
import pytest

from scpl_kit.report.grid import run_names
from scpl_kit.report.published import UNSPECIFIED_MODEL, published_columns

PUBLISHED = Path(__file__).resolve().parents[1] / "src/scpl_kit/report/published.csv"


def test_run_names_cover_every_part_with_its_own_seeds() -> None:
    grid = {
        "vision": {"profile": "offline", "datasets": ["mnist5k"], "models": ["vgg", "resnet18"], "methods": ["bp", "predsim"], "seeds": [0, 1]},
        "text": {"profile": "offline_text", "datasets": ["bbcnews"], "models": ["lstm"], "methods": ["bp"], "seeds": [0]},
        "off": None,  # a part set to null is skipped
    }
    expected = [f"mnist5k-{m}-{method}-s{s}" for m in ("vgg", "resnet18") for method in ("bp", "predsim") for s in (0, 1)]
    expected += ["bbcnews-lstm-bp-s0"]
    assert run_names(grid) == expected


def test_published_numbers_land_beside_their_rows() -> None:
    """Text rows get the text papers' numbers: exact model matches, and a source that names no model
    marked as such; a dataset no source reports (BBC News) gets none."""
    with open(PUBLISHED, newline="") as f:
        rows = list(csv.DictReader(f))
    exact = next(r for r in rows if (r["dataset"], r["model"], r["method"]) == ("dbpedia14", "lstm", "al"))
    unnamed = next(r for r in rows if (r["dataset"], r["model"], r["method"]) == ("agnews", "", "scpl"))
    table = pd.DataFrame({"dataset": ["dbpedia14", "agnews", "bbcnews"], "model": ["lstm", "transformer", "lstm"], "method": ["al", "scpl", "bp"]})
    columns = published_columns(table)
    assert columns.loc[0, f"published_{exact['source']}"] == f"{float(exact['accuracy']):.2f}"
    assert columns.loc[1, f"published_{unnamed['source']}"] == f"{float(unnamed['accuracy']):.2f}{UNSPECIFIED_MODEL}"
    assert (columns.loc[2] == "").all()


def test_local_k_table_puts_infopros_published_numbers_beside_the_matching_rows() -> None:
    from scpl_kit.report.local_k import local_runs, local_table

    part = {"profile": "paper_local", "dataset": "cifar10", "model": "resnet32", "ks": [2, 4], "seeds": [0, 1], "methods": ["dgl", "scpl"]}
    assert local_runs(part)[:3] == [("bp", 1, 0), ("bp", 1, 1), ("dgl", 2, 0)] and len(local_runs(part)) == 2 + 2 * 2 * 2
    runs = pd.DataFrame(
        [{"method": m, "k": k, "seed": s, "test_error": 10.0 + k + s, "peak_module_mem_mb": 100.0 / k} for m, k, s in local_runs(part)]
    )
    published = pd.read_csv(Path(__file__).parents[1] / "src/scpl_kit/report/published_local.csv")
    table = local_table(runs, part, published).set_index(["method", "k"])
    assert table.loc[("bp", 1), "published_test_error"] == 7.37 and table.loc[("dgl", 4), "published_test_error"] == 11.48
    assert pd.isna(table.loc[("scpl", 2), "published_test_error"])  # the InfoPro paper has no SCPL row
    assert table.loc[("dgl", 2), "error_mean"] == 12.5 and table.loc[("dgl", 2), "error_std"] == round(2**0.5 / 2, 2)
    assert table.loc[("dgl", 4), "mem_vs_bp"] == 0.25


def test_greedy_sl_not_early_exit_stands_beside_the_infopro_papers_greedy_sl() -> None:
    """Greedy SL there is a pooled linear head per module; Early Exit is the SCPL paper's method, another
    head: only greedy_sl's rows get the published Greedy SL errors, and no grid row the memory ratios
    (InfoPro*'s balanced cuts, compared in the memory check)."""
    from scpl_kit.report.local_k import local_runs, local_table

    part = {"profile": "paper_local", "dataset": "cifar10", "model": "resnet32", "ks": [2], "seeds": [0], "methods": ["greedy_sl", "early_exit"]}
    runs = pd.DataFrame([{"method": m, "k": k, "seed": s, "test_error": 10.0, "peak_module_mem_mb": 1.0} for m, k, s in local_runs(part)])
    published = pd.read_csv(Path(__file__).parents[1] / "src/scpl_kit/report/published_local.csv")
    table = local_table(runs, part, published).set_index(["method", "k"])
    assert table.loc[("greedy_sl", 2), "published_test_error"] == 10.30 and pd.isna(table.loc[("early_exit", 2), "published_test_error"])
    assert "published_mem_vs_bp" not in table.columns


def test_local_k_memory_is_what_the_run_recorded(tmp_path: Path) -> None:
    """Each module's peak over the epochs (a cascade trains one module an epoch), from history.csv; the
    process's peak where no unit's was recorded (CUDA); a run trained unmeasured is named."""
    from scpl_kit.preflight import PreflightError
    from scpl_kit.report.local_k import module_memory

    pd.DataFrame({"epoch": [1, 2], "memory/unit/block1/peak_mb": [10.0, None], "memory/unit/block2/peak_mb": [None, 7.5],
                  "memory/peak_mb": [12.0, 9.0]}).to_csv(tmp_path / "history.csv", index=False)
    assert module_memory(tmp_path) == [10.0, 7.5]
    pd.DataFrame({"epoch": [1, 2], "memory/peak_mb": [12.0, 13.0]}).to_csv(tmp_path / "history.csv", index=False)
    assert module_memory(tmp_path) == [13.0]
    pd.DataFrame({"epoch": [1], "val_acc": [0.5]}).to_csv(tmp_path / "history.csv", index=False)
    with pytest.raises(PreflightError, match="trainer.measure=true"):
        module_memory(tmp_path)
