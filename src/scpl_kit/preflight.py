"""What a run checks before its first step, so bad input fails in seconds and in one line that names
the key or file, instead of after training (an unwritable out_dir) or never (a batch that never fills).

Hydra leaves values untyped (`trainer.epochs=abc` composes fine), so the numeric keys a run relies on
are checked here against one table; a new method or engine key with a range belongs in RULES too.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class PreflightError(ValueError):
    """Input that cannot give a sensible run; the message names the key or file and what would do."""


@dataclass(frozen=True)
class Rule:
    kind: type  # int or float (an int is a valid float)
    low: float | None = None  # inclusive
    positive: bool = False  # > 0
    below_one: bool = False  # < 1
    nullable: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        bounds = [f"≥ {self.low:g}"] if self.low is not None else []
        bounds += ["> 0"] if self.positive else []
        bounds += ["< 1"] if self.below_one else []
        return " ".join([what, " and ".join(bounds), "or null" if self.nullable else ""]).replace("  ", " ").strip()

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and not isinstance(value, int)):
            return False
        return (
            math.isfinite(value)
            and (self.low is None or value >= self.low)
            and (not self.positive or value > 0)
            and (not self.below_one or value < 1)
        )


RULES: dict[str, Rule] = {
    "seed": Rule(int, low=0),
    "trainer.epochs": Rule(int, low=1),
    "trainer.batch_size": Rule(int, low=1),
    "trainer.eval_batch_size": Rule(int, low=1),
    "trainer.lr": Rule(float, positive=True),
    "trainer.lr_min": Rule(float, low=0),
    "trainer.threads": Rule(int, low=1, nullable=True),
    "model.width": Rule(float, positive=True),
    "model.predictor_hidden": Rule(int, low=1),
    "data.val_fraction": Rule(float, positive=True, below_one=True),
    "data.test_fraction": Rule(float, positive=True, below_one=True, nullable=True),
    "data.num_workers": Rule(int, low=0),
    "method.temperature": Rule(float, positive=True),
    "method.projector_hidden": Rule(int, low=1),
    "method.projector_dim": Rule(int, low=1),
    "method.hidden": Rule(int, low=1),
    "method.bridge_hidden": Rule(int, low=1),
    "method.code_dim": Rule(int, low=1),
    "method.label_lr_scale": Rule(float, positive=True),
    "method.modules": Rule(int, low=1, nullable=True),
    "method.mlp_hidden": Rule(int, low=1, nullable=True),
    "method.mlp_layers": Rule(int, low=1),
    "method.conv_layers": Rule(int, low=0),
    "method.side": Rule(int, low=1),
    "method.decoder_width": Rule(int, low=1),
    "engine.processes": Rule(int, low=1, nullable=True),
    "engine.microbatches": Rule(int, low=1),
    "engine.replicas": Rule(int, low=1),
    "engine.average_every": Rule(int, low=1),
    "engine.ranks_per_node": Rule(int, low=1, nullable=True),
    "engine.max_staleness": Rule(int, low=0),
    "engine.push_every": Rule(int, low=1),
    "engine.slow_rank": Rule(int, low=0, nullable=True),
    "engine.slowdown": Rule(float, low=1),
    "engine.timeout_s": Rule(float, positive=True),
}


def check_values(cfg: DictConfig) -> None:
    """Every key of RULES that this config has must hold a value in range."""
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=KeyError)
        if value is not KeyError and not rule.accepts(value):
            raise PreflightError(f"{key}={value!r}: expected {rule.describe()}")


def check_batch_fits(cfg: DictConfig, train_size: int) -> None:
    """Training drops the last incomplete batch, so a batch larger than the split trains nothing."""
    if cfg.trainer.batch_size > train_size:
        raise PreflightError(
            f"trainer.batch_size={cfg.trainer.batch_size} is larger than the training split of {cfg.data.name} "
            f"({train_size} samples): no full batch to train on"
        )


def check_augmentation_fits(cfg: DictConfig, modality: str) -> None:
    """Crops, flips and colour jitter are for images: a text run with them stops before it starts."""
    if modality != "image" and cfg.trainer.augmentation != "none":
        raise PreflightError(
            f"trainer.augmentation={cfg.trainer.augmentation} transforms images, but {cfg.data.name} is {modality}; "
            "set trainer.augmentation=none"
        )


def check_writable_dir(path: str | Path, key: str) -> None:
    """Create `path` if needed and prove a file can be written there (as root, os.access says yes to
    almost anything, so write one)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise PreflightError(f"{key}={path} is not a writable folder: {error.strerror or error}") from None


def check_sqlite_file(path: str | Path, what: str) -> None:
    """An sqlite database (say, MLflow's or Optuna's store) must sit in an existing, writable folder."""
    file = Path(path)
    if not file.parent.is_dir():
        raise PreflightError(f"{what} {file}: {file.parent} is not an existing folder")
    if not os.access(file.parent, os.W_OK) or (file.exists() and (not file.is_file() or not os.access(file, os.W_OK))):
        raise PreflightError(f"{what} {file} is not a writable file")
