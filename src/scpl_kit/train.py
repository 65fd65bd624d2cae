"""One training run: compose the config, wire data → model → method → engine, train, record.

    python -m scpl_kit.train method=scpl data=mnist5k trainer.epochs=2
    python -m scpl_kit.train --cfg            # print the composed config and stop
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from scpl_kit.config import ConfigError, compose_config, flatten, to_container
from scpl_kit.data.augment import Augmentation
from scpl_kit.data.datasets import PreparedData, load_prepared
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.engines import Engine, build_engine
from scpl_kit.methods import LocalUnit, NonFiniteLossError, build_units
from scpl_kit.models import BlockModel, build_model
from scpl_kit.registry import UnknownNameError
from scpl_kit.tracking import MlflowTracker, TrainingListener, git_commit
from scpl_kit.trainer import Checkpoint, Trainer, TrainingStopped, adam_cosine, configure_torch, seed_everything, summarize

log = logging.getLogger("scpl_kit")

# Errors caused by what the user asked for: reported in one line, without a traceback.
USER_ERRORS = (ConfigError, UnknownNameError, DatasetNotFoundError, CorruptDataError, NonFiniteLossError, ValueError)

# Settings that do not change what a run computes, so they do not change its checkpoint key.
NOT_IN_RUN_KEY = ("out_dir", "tracking", "trainer.progress", "trainer.resume", "trainer.checkpoint_dir", "data.num_workers")


def options(node: DictConfig) -> dict[str, Any]:
    """A config group's node without its `name`: the keyword arguments of the registered builder."""
    return {key: value for key, value in to_container(node).items() if key != "name"}


def load_data(cfg: DictConfig) -> PreparedData:
    expect = {"val_fraction": cfg.data.val_fraction, "test_fraction": cfg.data.test_fraction, "split_seed": cfg.data.split_seed}
    return load_prepared(cfg.data.name, cfg.data.processed_dir, verify=cfg.data.verify_checksum, expect=expect)


def build(cfg: DictConfig, data: PreparedData) -> tuple[BlockModel, list[LocalUnit]]:
    """The model and its units under the configured method, each unit with its optimizer."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, **options(cfg.model))
    units = build_units(cfg.method.name, model, **options(cfg.method))
    steps = (data.meta["sizes"]["train"] // cfg.trainer.batch_size) * cfg.trainer.epochs
    for unit in units:
        unit.configure_optimizer(adam_cosine(cfg.trainer.lr, cfg.trainer.lr_min, steps))
    return model, units


def run_key(cfg: DictConfig) -> str:
    settings = flatten(to_container(cfg))
    kept = {k: v for k, v in settings.items() if not any(k == p or k.startswith(p + ".") for p in NOT_IN_RUN_KEY)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_tags(cfg: DictConfig) -> dict[str, str]:
    tags = {
        "method": cfg.method.name, "dataset": cfg.data.name, "model": cfg.model.name, "engine": cfg.engine.name,
        "seed": str(cfg.seed), "git_commit": git_commit(), "dvc_stage": str(cfg.tracking.stage or "none"),
    }
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id  # nests the run under e.g. its sweep's run
    return tags


def write_outputs(
    out_dir: Path, cfg: DictConfig, history: list[dict[str, float]], summary: dict[str, float] | None,
    unit_states: list[dict[str, Any]] | None, run_id: str | None,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False)
    if summary is not None:
        identity = {
            "dataset": cfg.data.name, "model": cfg.model.name, "method": cfg.method.name, "engine": cfg.engine.name,
            "seed": cfg.seed, "mlflow_run_id": run_id,
        }
        (out_dir / "metrics.json").write_text(json.dumps({**identity, **summary}, indent=2) + "\n")
        torch.save({"units": [state["module"] for state in unit_states]}, out_dir / "model.pt")


def run(cfg: DictConfig, listeners: Sequence[TrainingListener] = ()) -> dict[str, float]:
    """Train one configuration end to end; returns the final metrics (see trainer.summarize).

    `listeners` hear every epoch's metrics (a sweep's pruner is one); one may raise TrainingStopped.
    Under a multi-process engine every process calls this; only the main one logs and writes."""
    configure_torch(cfg.trainer.threads, cfg.trainer.deterministic)
    data = load_data(cfg)
    _, units = build(cfg, data)
    engine = build_engine(cfg.engine.name, **options(cfg.engine))
    try:
        engine.setup(units)
        return train_with(cfg, data, engine, listeners)
    finally:
        engine.close()


def train_with(cfg: DictConfig, data: PreparedData, engine: Engine, listeners: Sequence[TrainingListener]) -> dict[str, float]:
    checkpoint = Checkpoint(Path(cfg.trainer.checkpoint_dir) / f"{run_key(cfg)}.pt")
    state = checkpoint.load() if cfg.trainer.resume else None
    if state is not None:
        engine.load_training_state(state["units"])
        log.info("resuming from %s after epoch %d", checkpoint.path, state["epoch"])
    tracker = MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment) if cfg.tracking.enabled and engine.is_main else None
    run_id = None
    if tracker is not None:
        run_name = cfg.tracking.run_name or f"{cfg.data.name}-{cfg.model.name}-{cfg.method.name}-s{cfg.seed}"
        run_id = tracker.start(run_name, flatten(to_container(cfg)), run_tags(cfg), run_id=state and state["run_id"])
    trainer = Trainer(
        engine, data, cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.eval_batch_size,
        Augmentation(cfg.trainer.augmentation, data.input_shape[-1], cfg.data.hflip), cfg.seed,
        progress=cfg.trainer.progress, listeners=[*([tracker] if tracker else []), *(listeners if engine.is_main else [])],
        checkpoint=checkpoint, run_id=run_id, eval_test=cfg.trainer.eval_test,
    )
    out_dir = Path(cfg.out_dir)
    history = state["history"] if state else []
    try:
        history = trainer.fit(start_epoch=len(history) + 1, history=history)
    except BaseException as error:
        if engine.is_main:
            write_outputs(out_dir, cfg, trainer_history(checkpoint, history), None, None, run_id)
        if tracker is not None:
            stopped = isinstance(error, (KeyboardInterrupt, TrainingStopped))
            tracker.set_tag("stopped" if stopped else "error", str(error)[:5000] or type(error).__name__)
            tracker.finish("KILLED" if stopped else "FAILED")
        if isinstance(error, TrainingStopped) and engine.is_main:
            checkpoint.remove()  # stopped on purpose: there is nothing to resume
        raise
    summary = summarize(history)
    unit_states = engine.training_state()  # collective: every process takes part
    if not engine.is_main:
        return summary
    write_outputs(out_dir, cfg, history, summary, unit_states, run_id)
    if tracker is not None:
        tracker.log_metrics(summary, step=cfg.trainer.epochs)
        for name in ("config.yaml", "metrics.json", "history.csv"):
            tracker.log_file(out_dir / name)
        tracker.finish()
    checkpoint.remove()  # the run is complete; its outputs hold everything the checkpoint did
    return summary


def trainer_history(checkpoint: Checkpoint, fallback: list[dict[str, float]]) -> list[dict[str, float]]:
    """The epochs finished before a failure (the checkpoint has them even when fit() did not return)."""
    state = checkpoint.load()
    return state["history"] if state else fallback


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scpl_kit.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: group=option or key=value")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = compose_config(args.overrides)
        if args.cfg:
            print(OmegaConf.to_yaml(cfg))
            return 0
        summary = run(cfg)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
