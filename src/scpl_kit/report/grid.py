"""The runs a DVC grid (params.yaml `grid`) trains, named as the train stages name their folders."""

from __future__ import annotations

from itertools import product
from typing import Any

from scpl_kit.preflight import PreflightError


def grid_parts(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """A grid's parts (`vision`, `text`): each a profile with its datasets, models, methods and seeds.
    A part set to null is skipped."""
    return [part for part in grid.values() if isinstance(part, dict) and "datasets" in part]


def run_names(grid: dict[str, Any]) -> list[str]:
    """`<dataset>-<model>-<method>-s<seed>` for every combination of every part, in the grid's order."""
    for name, part in grid.items():
        if isinstance(part, dict) and "datasets" in part:
            check_lists(part, ["datasets", "models", "methods", "seeds"], f"grid.{name}")
    return [
        f"{dataset}-{model}-{method}-s{seed}"
        for part in grid_parts(grid)
        for dataset, model, method, seed in product(part["datasets"], part["models"], part["methods"], part["seeds"])
    ]


def check_lists(node: dict[str, Any], keys: list[str], where: str) -> None:
    """A grid written by hand names its lists, as params.yaml's does: a typo fails here, in one line."""
    for key in keys:
        if not isinstance(node.get(key), list):
            raise PreflightError(f"{where}.{key} is {'missing' if key not in node else repr(node[key])}: expected a list, as in params.yaml")
