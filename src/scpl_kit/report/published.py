"""Published accuracies (methods.md §6) to put beside the kit's rows; never anything not in the papers.

published.csv: dataset, model, method, accuracy (%), source. An empty model means the source does
not say which backbone; such a number is shown for every model of that dataset, marked `*`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

SOURCES = {  # column name in the tables → where the numbers come from
    "scpl_paper": "SCPL paper (test accuracy as indexed)",
    "pipelined_al": "Pipelined Associated Learning paper (best test accuracy, same lab)",
    "scpl_package": "a later package by one of the SCPL authors (DBpedia, batch 1024)",
}
UNSPECIFIED_MODEL = "*"


def load_published(path: Path = Path(__file__).with_name("published.csv")) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"model": str}, keep_default_na=False)


def published_columns(rows: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """One `published_<source>` column per source with a number for some row of `rows` (dataset,
    model, method); empty where the source has none."""
    published = load_published() if published is None else published
    columns: dict[str, list[str]] = {}
    for source in SOURCES:
        values = []
        for row in rows.itertuples():
            match = published[(published.source == source) & (published.dataset == row.dataset) & (published.method == row.method)]
            exact = match[match.model == row.model]
            if len(exact):
                values.append(f"{exact.accuracy.iloc[0]:.2f}")
            elif len(unspecified := match[match.model == ""]):
                values.append(f"{unspecified.accuracy.iloc[0]:.2f}{UNSPECIFIED_MODEL}")
            else:
                values.append("")
        if any(values):
            columns[f"published_{source}"] = values
    return pd.DataFrame(columns, index=rows.index)
