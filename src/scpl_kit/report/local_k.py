"""Accuracy and memory against K, the number of gradient-isolated modules (the local-learning figure).

    python -m scpl_kit.report.local_k --params params.yaml --runs runs_local --out reports

Reads `runs_local/<dataset>-<model>-<method>-k<K>-s<seed>/metrics.json` for the grid's `local_k` part
(BP at K = 1 and every method at every K) and writes reports/tables/local_k.{md,csv} and
reports/figures/local_k.png:
  - test error (%) of the saved (best-validation) model, mean ± std over seeds;
  - peak activation memory of the largest module, as the run measured it (`trainer.measure=true`, which
    the DVC stages set): each module's high-water mark within its own training steps, the largest over
    the epochs (history.csv's `memory/unit/<name>/peak_mb`; CUDA keeps one peak per device, so there the
    process's); `mem_vs_bp` divides it by BP's (the whole network's) at the same batch size;
  - published numbers (methods.md §5: InfoPro's CIFAR-10 ResNet-32 / ResNet-110 table) beside the rows
    they match (in the offline default none match);
  - InfoPro's memory claim checked whatever the grid: ResNet-110 at full width on CIFAR-10-shaped
    batches, its largest module at K = 2 and 4 against BP (published: 57% and 37%).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from scpl_kit.preflight import OneLineParser, PreflightError, check_input_dir, check_output_dir, fail, load_params

LABELS = {
    "bp": "BP (end to end)", "early_exit": "Early Exit (SCPL paper)", "greedy_sl": "Greedy SL (pooled linear heads)", "dgl": "DGL", "infopro": "InfoPro", "contsup": "ContSup",
    "contsup_e": "ContSup E", "contsup_r1": "ContSup R1", "contsup_r1e": "ContSup R1E", "scpl": "SCPL", "cascade": "Deep cascade",
    "predsim": "PredSim", "auglocal": "AugLocal", "deinforeg": "DeInfoReg",
}
SOURCE = "InfoPro paper (Wang et al. 2021), CIFAR-10 (its Greedy SL rows beside greedy_sl)"


def run_name(part: dict[str, Any], method: str, k: int, seed: int) -> str:
    return f"{part['dataset']}-{part['model']}-{method}-k{k}-s{seed}"


def local_runs(part: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(method config, K, seed) of every run of the part: BP at K = 1, then each method at each K."""
    return [("bp", 1, seed) for seed in part["seeds"]] + [
        (method, k, seed) for method in part["methods"] for k in part["ks"] for seed in part["seeds"]
    ]


UNIT_MEMORY = re.compile(r"^memory/unit/(.+)/peak_mb$")


def module_memory(run_dir: Path) -> list[float]:
    """Peak activation memory (MB) of each module the run trained, the largest over its epochs (a
    cascade trains one module an epoch), from its history.csv; the process's peak where the run
    recorded no unit's (CUDA)."""
    history = pd.read_csv(run_dir / "history.csv")
    units = [column for column in history.columns if UNIT_MEMORY.match(column)]
    columns = units or [column for column in ("memory/peak_mb",) if column in history.columns]
    if not columns:
        raise PreflightError(f"{run_dir} recorded no memory: train it with trainer.measure=true (the DVC stages do)")
    return [float(history[column].max()) for column in columns]


CHECKED = (("bp", 1), ("infopro", 2), ("infopro", 4))  # the DVC stage train_memory_check's runs, runs_local/memory_check-<method>-k<K>


def memory_check(published: pd.DataFrame, runs: Path) -> pd.DataFrame:
    """InfoPro's claim (ResNet-110, CIFAR-10, batch 1024 on a GPU: 9.40 GB end to end, 5.38 GB at K = 2,
    3.52 GB at K = 4) as the table measures it: the largest module's peak activation memory over BP's, as
    the runs of conf/profile/resnet110_memory.yaml measured it (full width, CIFAR-10-shaped batches of 64)."""
    table = pd.DataFrame([{"method": method, "k": k, "peak_module_mem_mb": max(module_memory(runs / f"memory_check-{method}-k{k}"))}
                          for method, k in CHECKED])
    table["mem_vs_bp"] = (table.peak_module_mem_mb / table.peak_module_mem_mb.iloc[0]).round(3)
    claimed = published[(published.model == "resnet110") & (published.metric == "mem_vs_bp")].set_index(["method", "k"]).value
    table["published_mem_vs_bp"] = [claimed.get((f"{m}_balanced", k), 1.0 if m == "bp" else float("nan")) for m, k in zip(table.method, table.k)]
    return table.round({"peak_module_mem_mb": 1})


def check_part(part: dict[str, Any]) -> None:
    """The grid's local_k part names what local_runs and run_name read."""
    for key, kind in (("dataset", str), ("model", str), ("profile", str), ("methods", list), ("ks", list), ("seeds", list)):
        if not isinstance(part.get(key), kind):
            raise PreflightError(f"grid.local_k.{key} is {'missing' if key not in part else repr(part[key])}: expected a "
                                 f"{'list' if kind is list else 'name'}, as in params.yaml")


def check_runs(part: dict[str, Any], runs: Path) -> None:
    """Every run of the part finished (metrics.json, and history.csv with its measured memory), checked before any work."""
    folders = [runs / run_name(part, config, k, seed) for config, k, seed in local_runs(part)] + [runs / f"memory_check-{m}-k{k}" for m, k in CHECKED]
    missing = [str(folder) for folder in folders if not all((folder / name).is_file() for name in ("metrics.json", "history.csv"))]
    if missing:
        others = f" (and {len(missing) - 1} more of the {len(folders)} runs)" if len(missing) > 1 else ""
        raise PreflightError(f"--runs: {missing[0]} has no metrics.json or history.csv{others}; run `dvc repro` first")


def collect(part: dict[str, Any], runs: Path) -> pd.DataFrame:
    rows, memory = [], {}
    for config, k, seed in local_runs(part):
        run_dir = runs / run_name(part, config, k, seed)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if (config, k) not in memory:  # memory does not depend on the seed
            memory[config, k] = max(module_memory(run_dir))
        rows.append({"method": config, "k": k, "seed": seed, "test_error": 100 * (1 - metrics["test_acc"]), "peak_module_mem_mb": memory[config, k]})
    return pd.DataFrame(rows)


def local_table(runs: pd.DataFrame, part: dict[str, Any], published: pd.DataFrame) -> pd.DataFrame:
    table = runs.groupby(["method", "k"], sort=False).agg(
        n_runs=("seed", "count"), error_mean=("test_error", "mean"), error_std=("test_error", "std"), peak_module_mem_mb=("peak_module_mem_mb", "first"),
    ).reset_index()
    table["error_std"] = table.error_std.fillna(0.0)
    table["mem_vs_bp"] = table.peak_module_mem_mb / table.loc[table.method == "bp", "peak_module_mem_mb"].iloc[0]
    here = published[(published.dataset == part["dataset"]) & (published.model == part["model"])]
    # Test errors only: the published memory ratios are InfoPro*'s (balanced cuts), set beside runs with
    # the same cuts in the memory check below, not beside this grid's even cuts.
    values = here[here.metric == "test_error"].set_index(["method", "k"]).value
    table["published_test_error"] = [values.get((m, k), float("nan")) for m, k in zip(table.method, table.k)]
    return table.round({"error_mean": 2, "error_std": 2, "peak_module_mem_mb": 2, "mem_vs_bp": 3})


def markdown(table: pd.DataFrame, part: dict[str, Any]) -> str:
    shown = table.assign(
        method=table.method.map(lambda m: LABELS.get(m, m)),
        test_error=[f"{m:.2f} ± {s:.2f}" for m, s in zip(table.error_mean, table.error_std)],
        published_test_error=table.published_test_error.map(lambda v: "" if pd.isna(v) else f"{v:g}"),
    )
    columns = ["method", "k", "n_runs", "test_error", "published_test_error", "peak_module_mem_mb", "mem_vs_bp"]
    shown = shown[columns].rename(columns={"k": "K"})
    return (
        f"# Test error (%) and memory against K, {part['dataset']} / {part['model']} (profile {part['profile']})\n\n"
        "K gradient-isolated modules cut evenly at layer boundaries (method.modules, the even cuts); K = 1 is BP. `test_error`: 100 − the test "
        "accuracy of the saved, best-validation model (mean ± std over seeds). `peak_module_mem_mb`: peak activation memory of "
        "the largest module within its own training steps, as the run measured it (profiler, trainer.measure); `mem_vs_bp`: ÷ BP's for the whole "
        f"network. Published: {SOURCE}; empty where the source has no number for this dataset and model.\n\n"
        + shown.to_markdown(index=False) + "\n"
    )


def plot(table: pd.DataFrame, path: Path) -> None:
    """Test error and memory ratio against K, one line per method; published numbers dashed."""
    fig, (error, memory) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    bp = table[table.method == "bp"].iloc[0]
    for ax, column in ((error, "error_mean"), (memory, "mem_vs_bp")):
        ax.axhline(bp[column], color="black", lw=0.8, ls=":", label=LABELS["bp"])
    for method, rows in table[table.method != "bp"].groupby("method", sort=False):
        line, = error.plot(rows.k, rows.error_mean, marker="o", label=LABELS.get(method, method))
        memory.plot(rows.k, rows.mem_vs_bp, marker="o", color=line.get_color())
        if rows.published_test_error.notna().any():
            error.plot(rows.k, rows.published_test_error, ls="--", marker="x", color=line.get_color(), label=f"{LABELS.get(method, method)} (published)")
    for ax in (error, memory):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(table.k)), [str(k) for k in sorted(set(table.k))])
        ax.grid(alpha=0.3)
    error.set(xlabel="K (modules)", ylabel="test error (%)", title="accuracy against K")
    memory.set(xlabel="K (modules)", ylabel="largest module ÷ BP", title="peak activation memory against K")
    error.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_markdown(check: pd.DataFrame) -> str:
    return (
        "\n## InfoPro's memory claim, checked: ResNet-110, CIFAR-10-shaped batches of 64\n\n"
        "The largest module's peak activation memory over BP's (one profiled training step after a warm-up, as the runs of the DVC stage train_memory_check measured it), beside the InfoPro "
        "paper's ratio of GPU memory for the whole training at batch 1024 (9.40 GB end to end), which was measured with "
        "InfoPro*'s memory-balanced cut points: so are these (`method.cuts=balanced`: modules start at layers 16 (K = 2) and "
        "8, 16, 28 (K = 4) of ResNet-110's 55, the stem being layer 0). InfoPro's modules include its decoder, which upsamples "
        "the module's output to the image's 32×32.\n\n" + check.assign(method=check.method.map(lambda m: LABELS.get(m, m))).rename(columns={"k": "K"}).to_markdown(index=False) + "\n"
    )


def build_report(part: dict[str, Any], runs: Path, out: Path) -> str:
    published = pd.read_csv(Path(__file__).with_name("published_local.csv"))
    table = local_table(collect(part, runs), part, published)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "tables" / "local_k.csv", index=False)
    text = markdown(table, part) + check_markdown(memory_check(published, runs))
    (out / "tables" / "local_k.md").write_text(text)
    plot(table, out / "figures" / "local_k.png")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m scpl_kit.report.local_k", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--runs", type=Path, default=Path("runs_local"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    try:
        part = load_params(args.params, "grid.local_k")
        check_part(part)
        check_input_dir(args.runs, "--runs")
        check_runs(part, args.runs)
        check_output_dir(args.out, "--out")
        text = build_report(part, args.runs, args.out)  # writes only once every run is read
    except PreflightError as error:
        return fail(error)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
