"""The runs a DVC grid (params.yaml `grid`) trains, named as the train stages name their folders."""

from __future__ import annotations

from itertools import product
from typing import Any


def grid_parts(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """A grid's parts (`vision`, `text`): each a profile with its datasets, models and seeds, trained
    under the grid's methods. A part set to null is skipped."""
    return [part for part in grid.values() if isinstance(part, dict) and "datasets" in part]


def run_names(grid: dict[str, Any]) -> list[str]:
    """`<dataset>-<model>-<method>-s<seed>` for every combination of every part, in the grid's order."""
    return [
        f"{dataset}-{model}-{method}-s{seed}"
        for part in grid_parts(grid)
        for dataset, model, method, seed in product(part["datasets"], part["models"], grid["methods"], part["seeds"])
    ]
