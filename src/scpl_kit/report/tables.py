"""The accuracy tables and figures from finished runs.

    python -m scpl_kit.report.tables --params params.yaml --runs runs --out reports

Reads `runs/<dataset>-<model>-<method>-s<seed>/{metrics.json,history.csv}` for the grid params.yaml
names (stale folders of removed seeds are ignored) and writes reports/tables/accuracy.{md,csv}
(published numbers beside ours), reports/tables/per_exit.{md,csv}, reports/figures/accuracy_curves.png,
reports/figures/per_exit.png and reports/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import pandas as pd

from scpl_kit.environment import one_line
from scpl_kit.preflight import OneLineParser, PreflightError, check_input_dir, check_output_dir, fail, load_params
from scpl_kit.report.exits import exit_markdown, exit_table, plot_exits
from scpl_kit.report.grid import run_names
from scpl_kit.report.published import SOURCES, UNSPECIFIED_MODEL, published_columns

# A row: what was trained (`config` is the conf/method/ file: a method, a tuned method, or a method × engine pair).
GROUP = ["dataset", "model", "method", "config", "engine"]
PANEL_INCHES, DPI, MAX_COLUMNS = (5, 3.6), 100, 2  # ≤ 1000 px wide: `dvc plots show` crops wider images


def run_dirs(runs: Path, grid: dict) -> list[Path]:
    dirs = [runs / name for name in run_names(grid)]
    missing = [str(d) for d in dirs if not (d / "metrics.json").is_file() or not (d / "history.csv").is_file()]
    if missing:
        others = f" (and {len(missing) - 1} more of the {len(dirs)} runs)" if len(missing) > 1 else ""
        raise PreflightError(f"--runs: {missing[0]} has no metrics.json or history.csv{others}; run `dvc repro` first")
    return dirs


def load_runs(dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per run, one row per run and epoch)."""
    records = [json.loads((d / "metrics.json").read_text()) for d in dirs]
    finals = pd.DataFrame([
        {**r, "config": r.get("method_config") or r["method"], "engine": r.get("engine_detail") or r["engine"]} for r in records
    ])
    curves = pd.concat(
        [pd.read_csv(d / "history.csv").assign(**{k: final[k] for k in [*GROUP, "seed"]}) for d, (_, final) in zip(dirs, finals.iterrows())],
        ignore_index=True,
    )
    return finals, curves


def accuracy_table(finals: pd.DataFrame) -> pd.DataFrame:
    """Accuracy in %: `acc` = test accuracy at the best-validation epoch; `best_test` = the paper's
    metric (best test accuracy over epochs). std is the sample std over seeds (0 for one run)."""
    table = finals.groupby(GROUP, sort=False).agg(
        n_runs=("seed", "count"),
        acc_mean=("test_acc", "mean"), acc_std=("test_acc", "std"),
        best_test_mean=("best_test_acc", "mean"), best_test_std=("best_test_acc", "std"),
        samples_per_s=("samples_per_s", "mean"), train_time_s=("train_time_s", "mean"),
    ).reset_index()
    for column in ("acc_mean", "acc_std", "best_test_mean", "best_test_std"):
        table[column] = (100 * table[column].fillna(0.0)).round(2)
    table = table.round({"samples_per_s": 1, "train_time_s": 1})
    return table.join(published_columns(table))


def markdown(table: pd.DataFrame, finals: pd.DataFrame) -> str:
    published = [c for c in table.columns if c.startswith("published_")]
    shown = table.assign(
        accuracy=[f"{m:.2f} ± {s:.2f}" for m, s in zip(table.acc_mean, table.acc_std)],
        best_test=[f"{m:.2f} ± {s:.2f}" for m, s in zip(table.best_test_mean, table.best_test_std)],
    )[[*GROUP, "n_runs", "accuracy", "best_test", *published, "samples_per_s", "train_time_s"]]
    environments = sorted({one_line(env) for env in finals.environment})
    sources = "".join(f"- `{c}`: {SOURCES[c.removeprefix('published_')]}\n" for c in published)
    return (
        "# Test accuracy (%)\n\n"
        "`accuracy`: validation-selected test accuracy, i.e. the test accuracy of the saved model `model.pt`, the "
        "weights of the epoch with the best validation accuracy (mean ± std over seeds). `best_test`: best test "
        "accuracy over epochs, the paper's metric (it selects on the test set). `engine`: how the row was trained "
        "(K processes, M micro-batches).\n\n"
        f"Profile: {', '.join(sorted(set(finals.profile)))}. Trained on: {'; '.join(environments)}. "
        "Runs repeat bitwise on the same machine and thread count; on another CPU type, single seeds moved by up to 0.5 points.\n\n"
        + (f"Published numbers (methods.md §6), empty where a source has none; `{UNSPECIFIED_MODEL}`: the source does not name the model.\n"
           + sources + "\n" if published else "")
        + shown.to_markdown(index=False) + "\n"
    )


def plot_curves(curves: pd.DataFrame, path: Path) -> None:
    """Test accuracy per epoch, one line per row (mean over seeds, band = min..max), a panel per dataset/model."""
    panels = list(curves.groupby(["dataset", "model"], sort=False))
    columns = min(len(panels), MAX_COLUMNS)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for ax, ((dataset, model), frame) in zip(axes.flat, panels):
        for config, rows in frame.groupby("config", sort=False):
            per_epoch = rows.groupby("epoch")["test_acc"]
            mean = 100 * per_epoch.mean()
            ax.plot(mean.index, mean.values, marker="o", label=f"{config} (n={rows.seed.nunique()})")
            ax.fill_between(mean.index, 100 * per_epoch.min(), 100 * per_epoch.max(), alpha=0.2)
        ax.set(title=f"{dataset} / {model}", xlabel="epoch", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def build_reports(params: dict, runs: Path, out: Path) -> str:
    """Write the tables, the figures and the metrics; return the accuracy table in markdown."""
    finals, curves = load_runs(run_dirs(runs, params["grid"]))
    table = accuracy_table(finals)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "tables" / "accuracy.csv", index=False)
    text = markdown(table, finals)
    (out / "tables" / "accuracy.md").write_text(text)
    plot_curves(curves, out / "figures" / "accuracy_curves.png")
    exit_group = ["dataset", "model", "config"]
    exits = exit_table(finals, exit_group)
    exits.to_csv(out / "tables" / "per_exit.csv", index=False)
    (out / "tables" / "per_exit.md").write_text(exit_markdown(exits, exit_group))
    plot_exits(exits, exit_group, out / "figures" / "per_exit.png")
    groups = dict(list(finals.groupby(GROUP, sort=False)))
    summary = {}
    for r in table.itertuples():
        group = groups[tuple(getattr(r, g) for g in GROUP)]
        run_ids = {f"s{seed}": run_id for seed, run_id in zip(group.seed, group.mlflow_run_id)}  # where each row's runs are in MLflow
        summary[f"{r.dataset}/{r.model}/{r.config}"] = {"acc_mean": r.acc_mean, "acc_std": r.acc_std, "n_runs": r.n_runs, "mlflow_run_ids": run_ids}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m scpl_kit.report.tables", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    try:
        params = {"grid": load_params(args.params, "grid")}
        check_input_dir(args.runs, "--runs")
        run_dirs(args.runs, params["grid"])  # every run there, before anything is written
        check_output_dir(args.out, "--out")
    except PreflightError as error:
        return fail(error)
    print(build_reports(params, args.runs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
