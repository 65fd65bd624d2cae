"""The runs a DVC grid (params.yaml `grid`) trains, named as the train stage names their folders."""

from __future__ import annotations

from itertools import product
from typing import Any


def run_names(grid: dict[str, Any]) -> list[str]:
    """`<dataset>-<model>-<method>-s<seed>` for every combination, in the grid's order."""
    combos = product(grid["datasets"], grid["models"], grid["methods"], grid["seeds"])
    return [f"{dataset}-{model}-{method}-s{seed}" for dataset, model, method, seed in combos]
