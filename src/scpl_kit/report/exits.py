"""Accuracy of each block's own readout (an Early-Exit classifier, AL's decoded bridge), the SCPL
paper's "accuracy per layer" question: reports/tables/per_exit.{md,csv}, reports/figures/per_exit.png."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

EXIT_PREFIX = "test_acc/"


def exit_table(finals: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Mean and std over seeds (%) of `test_acc/<block>` and of the model's answer (`final`), at the
    epoch of best validation accuracy; rows only for methods whose blocks have a readout."""
    exits = sorted((c for c in finals.columns if c.startswith(EXIT_PREFIX)), key=lambda c: (len(c), c))
    with_exits = finals[finals[exits].notna().any(axis=1)] if exits else finals.iloc[:0]
    renamed = with_exits.rename(columns={c: c.removeprefix(EXIT_PREFIX) for c in exits}).assign(final=with_exits.test_acc)
    blocks = [c.removeprefix(EXIT_PREFIX) for c in exits] + ["final"]
    grouped = renamed.groupby(group, sort=False)[blocks]
    mean, std = (100 * grouped.mean()).round(2), (100 * grouped.std().fillna(0.0)).round(2)
    return mean.join(std, rsuffix="_std").reset_index()


def exit_markdown(table: pd.DataFrame, group: list[str]) -> str:
    blocks = [c for c in table.columns if c not in group and not c.endswith("_std")]
    shown = table[group].copy()
    for block in blocks:
        shown[block] = [("" if pd.isna(m) else f"{m:.2f} ± {s:.2f}") for m, s in zip(table[block], table[f"{block}_std"])]
    return (
        "# Test accuracy of each block's readout (%)\n\n"
        "Each block's own classifier (Early Exit; PredSim's linear one; AugLocal's auxiliary net; DeInfoReg's, on its "
        "projection) or its bridge decoded through the inverse chain (AL), at the epoch of best validation accuracy "
        "(mean ± std over seeds); `final` is the model's answer (the predictor, or AL's and DeInfoReg's last block; "
        "AugLocal's last module has no exit of its own). Methods whose blocks have no readout of their own (BP; SCPL, whose projectors are "
        "not classifiers) have no row: their only readout is `test_acc` in the accuracy table.\n\n"
        + shown.to_markdown(index=False) + "\n"
    )


def plot_exits(table: pd.DataFrame, group: list[str], path: Path) -> None:
    """Accuracy against block, one line per row (labelled by the last `group` column), one panel per dataset/model."""
    blocks = [c for c in table.columns if c not in group and not c.endswith("_std")]
    panels = list(table.groupby(["dataset", "model"], sort=False))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(min(5 * len(panels), 9.5), 3.6), squeeze=False)
    for ax, ((dataset, model), rows) in zip(axes.flat, panels):
        for row in rows.itertuples(index=False):
            values = pd.Series([getattr(row, b) for b in blocks], index=blocks).dropna()
            ax.plot(values.index, values.values, marker="o", label=getattr(row, group[-1]))
        ax.set(title=f"{dataset} / {model}", xlabel="readout", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
