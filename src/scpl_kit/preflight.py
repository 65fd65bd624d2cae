"""What a run checks before its first step, so bad input fails in seconds and in one line that names
the key or file, instead of after training (an unwritable out_dir) or never (a batch that never fills).

Hydra leaves values untyped (`trainer.epochs=abc` composes fine), so the numeric keys a run relies on
are checked here against one table; a new method or engine key with a range belongs in RULES too.

The other entry points (prepare, evaluate, sweep, submit, the report modules, the benches) keep the
same rule: bad input ends in exit status 2 and one line, `error: ...`, that names the key, option or
file, before anything is written. The helpers they share are at the end: OneLineParser (argparse's
own errors in that form), fail (print an error as that line), check_options (command-line numbers
against Rules), load_params, and the file and folder checks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NoReturn

import yaml
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
    high: float | None = None  # inclusive
    words: tuple[str, ...] = ()  # strings accepted besides numbers (engine.average_every: "epoch")

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        bounds = [f"≥ {self.low:g}"] if self.low is not None else []
        bounds += ["> 0"] if self.positive else []
        bounds += ["< 1"] if self.below_one else []
        bounds += [f"≤ {self.high:g}"] if self.high is not None else []
        alternatives = " ".join(f"or {word!r}" for word in self.words)
        return " ".join([what, " and ".join(bounds), alternatives, "or null" if self.nullable else ""]).replace("  ", " ").strip()

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, str):
            return value in self.words
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and not isinstance(value, int)):
            return False
        return (
            math.isfinite(value)
            and (self.low is None or value >= self.low)
            and (not self.positive or value > 0)
            and (not self.below_one or value < 1)
            and (self.high is None or value <= self.high)
        )


RULES: dict[str, Rule] = {
    "seed": Rule(int, low=0),
    "trainer.epochs": Rule(int, low=1),
    "trainer.batch_size": Rule(int, low=1),
    "trainer.eval_batch_size": Rule(int, low=1),
    "trainer.threads": Rule(int, low=1, nullable=True),
    "trainer.stop_at_val_acc": Rule(float, positive=True, high=1, nullable=True),
    "trainer.steps_per_epoch": Rule(int, low=1, nullable=True),
    "trainer.measure_memory_steps": Rule(int, low=0),
    "tracking.system_metrics_s": Rule(float, positive=True, nullable=True),
    "data.samples": Rule(int, low=10),  # the synthetic images: one per class at least
    "optimizer.lr": Rule(float, positive=True),
    "optimizer.lr_min": Rule(float, low=0),
    "optimizer.weight_decay": Rule(float, low=0),
    "optimizer.momentum": Rule(float, low=0, below_one=True),
    "optimizer.warmup_epochs": Rule(float, low=0),
    "optimizer.gamma": Rule(float, positive=True, high=1),
    "optimizer.patience": Rule(int, low=0),
    "optimizer.clip_norm": Rule(float, positive=True, nullable=True),
    "optimizer.accumulate": Rule(int, low=1),
    "model.width": Rule(float, positive=True),  # any width > 0 builds: each layer keeps max(1, round(channels × width)) channels
    "model.predictor_hidden": Rule(int, low=1),
    "model.dim": Rule(int, low=1),  # the text models' width (the image models' is model.width)
    "model.heads": Rule(int, low=1),
    "model.ff_dim": Rule(int, low=1),
    "model.dropout": Rule(float, low=0, below_one=True),
    "data.val_fraction": Rule(float, positive=True, below_one=True),
    "data.test_fraction": Rule(float, positive=True, below_one=True, nullable=True),
    "data.split_seed": Rule(int, low=0),
    "data.num_workers": Rule(int, low=0),
    "data.image_size": Rule(int, low=1),
    "data.max_len": Rule(int, low=1),
    "data.vocab_size": Rule(int, low=3),  # ids 0 = <pad> and 1 = <unk>, then at least one word
    "data.glove_dim": Rule(int, low=1),
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
    "engine.average_every": Rule(int, low=1, words=("epoch",)),
    "engine.ranks_per_node": Rule(int, low=1, nullable=True),
    "engine.max_staleness": Rule(int, low=0),
    "engine.push_every": Rule(int, low=1),
    "engine.slow_rank": Rule(int, low=0, nullable=True),
    "engine.slowdown": Rule(float, low=1),
    "engine.timeout_s": Rule(float, positive=True),
}


def check_values(cfg: DictConfig, rules: Mapping[str, Rule] = RULES, under: str = "") -> None:
    """Every key of `rules` (under `under`, e.g. "data.") that this config has must hold a value in
    range; then the values that are each in range but cannot be met together."""
    for key, rule in rules.items():
        value = OmegaConf.select(cfg, key, default=KeyError)
        if key.startswith(under) and value is not KeyError and not rule.accepts(value):
            raise PreflightError(f"{key}={value!r}: expected {rule.describe()}")
    if rules is RULES and "data.val_fraction".startswith(under):
        check_fractions(cfg)


def check_fractions(cfg: DictConfig) -> None:
    """Validation and test are cut from the whole set: what they leave is the training split."""
    val, test = OmegaConf.select(cfg, "data.val_fraction"), OmegaConf.select(cfg, "data.test_fraction")
    if isinstance(val, (int, float)) and isinstance(test, (int, float)) and val + test >= 1:
        raise PreflightError(
            f"data.val_fraction={val} + data.test_fraction={test} = {val + test:g} leaves nothing to train on: they must sum to < 1"
        )


def check_options(values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Command-line numbers (argparse has typed them) against Rules: `values` maps an option, as the
    user writes it (`--target`), to its value."""
    for option, rule in rules.items():
        if not rule.accepts(values[option]):
            raise PreflightError(f"{option} {values[option]!r}: expected {rule.describe()}")


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


def check_output_dir(path: str | Path, key: str) -> None:
    """A folder that a command will write into (creating it if need be) could be: it exists as a
    writable folder, or its nearest existing parent is one. Creates nothing, so a command whose
    input is bad too leaves no empty folder behind."""
    folder = Path(path)
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise PreflightError(f"{key}={path} is not a writable folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{key}={path} is not a writable folder: {existing} is not writable")


def check_input_dir(path: str | Path, key: str) -> None:
    if not Path(path).is_dir():
        raise PreflightError(f"{key}={path} is not a folder")


def check_input_file(path: str | Path, key: str) -> None:
    if not Path(path).is_file():
        raise PreflightError(f"{key}={path} is not a file")


def load_params(path: str | Path, section: str, key: str = "--params") -> Any:
    """`section` (dotted, e.g. grid.local_k) of a YAML file such as params.yaml."""
    check_input_file(path, key)
    try:
        node = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise PreflightError(f"{key}={path} is not readable YAML: {one_line(error)}") from None
    for part in section.split("."):
        if not isinstance(node, dict) or not isinstance(node.get(part), (dict, list)):
            raise PreflightError(f"{key}={path} has no `{section}` section (a params.yaml with the DVC grid, as in the repository's)")
        node = node[part]
    return node


def one_line(error: BaseException | str) -> str:
    """A message on one line. Hydra's messages list options one a line after a line ending in a colon
    ("Could not find 'sweep/x'", "Available options in 'sweep':", "bp_lr", "scpl_tau_lr"): they become
    "Could not find 'sweep/x'; available options in 'sweep': bp_lr, scpl_tau_lr"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text, listing = "", False
    for line in lines:
        if not text:
            text = line
        elif listing:
            text += (" " if text.endswith(":") else ", ") + line
        else:
            text += "; " + line[0].lower() + line[1:]
        listing = listing or line.endswith(":")
    return text or type(error).__name__


def fail(error: BaseException | str) -> int:
    """Report bad input the kit's way: one line on stderr, exit status 2 (return it from main)."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its own errors (a missing argument, `--rounds abc`) in the one-line form:
    `error: argument --rounds: invalid int value: 'abc'`, exit status 2, without the usage block."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")
        sys.exit(2)


def check_devices(cfg: DictConfig) -> None:
    """`engine.device` (or the threads engine's `engine.devices`) names devices this machine has, and
    `engine.backend` can carry tensors there; refused in one line that names the key (devices.py)."""
    from scpl_kit.devices import DeviceError, backend_for, local_rank, resolve_device  # here: preflight itself loads without torch

    engine = cfg.get("engine") or {}
    keys = [("engine.device", engine["device"])] if engine.get("device") is not None else []
    keys += [(f"engine.devices[{i}]", spec) for i, spec in enumerate(engine.get("devices") or [])]
    for key, spec in keys:
        try:
            device = resolve_device(str(spec), local_rank() or 0)
            if engine.get("backend") is not None:
                backend_for(device, str(engine["backend"]))
        except DeviceError as error:
            raise PreflightError(f"{key}: {error}") from None
