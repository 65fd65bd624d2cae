"""One training run: compose the config, wire data → model → method → engine, train, record.

    python -m scpl_kit.train method=scpl data=mnist5k trainer.epochs=2
    python -m scpl_kit.train --cfg            # print the composed config and stop
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
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
from scpl_kit.data.sources import source_options
from scpl_kit.engines import Engine, build_engine
from scpl_kit.engines.base import LaunchError, PeerError
from scpl_kit.engines.launch import start_local
from scpl_kit.engines.measure import MEMORY_STEPS
from scpl_kit.databases import refuse_passwords
from scpl_kit.environment import describe as describe_environment
from scpl_kit.methods import LocalUnit, NonFiniteLossError, build_units
from scpl_kit.models import BlockModel, build_model
from scpl_kit.preflight import OneLineParser, check_augmentation_fits, check_batch_fits, check_devices, check_values, check_writable_dir
from scpl_kit.registry import UnknownNameError
from scpl_kit.tracking import MlflowTracker, TrainingListener, git_commit
from scpl_kit.trainer import BestWeights, Checkpoint, Trainer, TrainingStopped, configure_torch, seed_everything, summarize
from scpl_kit.updater import OptimizerSettings, UpdateRecipe

log = logging.getLogger("scpl_kit")

# Errors caused by what the user asked for (or by a peer process that stopped answering): reported
# in one line, without a traceback. PreflightError and ConfigError are ValueErrors.
USER_ERRORS = (ConfigError, UnknownNameError, DatasetNotFoundError, CorruptDataError, NonFiniteLossError, ValueError, LaunchError, PeerError)

# Settings that do not change what a run computes, so they do not change its checkpoint key.
NOT_IN_RUN_KEY = ("out_dir", "tracking", "trainer.progress", "trainer.resume", "trainer.checkpoint_dir", "data.num_workers")


def options(node: DictConfig) -> dict[str, Any]:
    """A config group's node without its `name`: the keyword arguments of the registered builder."""
    return {key: value for key, value in to_container(node).items() if key != "name"}


def load_data(cfg: DictConfig) -> PreparedData:
    expect = {
        "val_fraction": cfg.data.val_fraction, "test_fraction": cfg.data.test_fraction, "split_seed": cfg.data.split_seed,
        **source_options(cfg.data.name, cfg.data),  # e.g. Tiny-ImageNet's image_size
    }
    return load_prepared(cfg.data.name, cfg.data.processed_dir, verify=cfg.data.verify_checksum, expect=expect)


def build(cfg: DictConfig, data: PreparedData) -> tuple[BlockModel, list[LocalUnit]]:
    """The model and its units under the configured method (the engine adds their updaters)."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, **options(cfg.model))
    if data.embeddings is not None:  # text data prepared with pretrained word vectors (GloVe)
        model.load_embeddings(data.embeddings)
    if "mean" in data.meta:  # image data: the normalisation a method may undo (InfoPro reconstructs pixels)
        model.set_input_statistics(data.meta["mean"], data.meta["std"])
    units = build_units(cfg.method.name, model, data.num_classes, **options(cfg.method))
    if cfg.trainer.get("channels_last") and len(data.input_shape) == 3:  # images: convolutions take NHWC weights
        units = [unit.to(memory_format=torch.channels_last) for unit in units]
    return model, units


def update_recipe(cfg: DictConfig, data: PreparedData) -> UpdateRecipe:
    """conf/optimizer/ over the run's length: every batch of an epoch (the last partial one dropped), or
    `trainer.steps_per_epoch` of them."""
    steps = data.meta["sizes"]["train"] // cfg.trainer.batch_size
    return UpdateRecipe(OptimizerSettings.from_config(cfg.optimizer), min(steps, cfg.trainer.get("steps_per_epoch") or steps), cfg.trainer.epochs)


def run_key(cfg: DictConfig) -> str:
    settings = flatten(to_container(cfg))
    kept = {k: v for k, v in settings.items() if not any(k == p or k.startswith(p + ".") for p in NOT_IN_RUN_KEY)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_tags(cfg: DictConfig) -> dict[str, str]:
    tags = {
        **({"grid_part": str(cfg.tracking.group)} if cfg.tracking.get("group") else {}),
        "method": cfg.method.name, "dataset": cfg.data.name, "model": cfg.model.name, "engine": cfg.engine.name,
        "seed": str(cfg.seed), "git_commit": git_commit(), "dvc_stage": str(cfg.tracking.stage or "none"),
        **{f"config.{group}": str(option) for group, option in cfg.choices.items()},  # e.g. config.profile=smoke
        **{f"env.{key}": value for key, value in describe_environment().items()},
        **{str(key): str(value) for key, value in (cfg.tracking.tags or {}).items()},
    }
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id  # nests the run under e.g. its sweep's run
    return tags


def write_outputs(out_dir: Path, cfg: DictConfig, history: list[dict[str, float]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False)


def engine_detail(cfg: DictConfig) -> str:
    """How the engine ran, for tables: e.g. `gpipe K=2 M=4` (processes, micro-batches)."""
    parts = [cfg.engine.name]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        parts.append(f"K={os.environ['WORLD_SIZE']}")
    if "microbatches" in cfg.engine:
        parts.append(f"M={cfg.engine.microbatches}")
    return " ".join(parts)


def write_results(out_dir: Path, cfg: DictConfig, summary: dict[str, float], best: BestWeights, run_id: str | None,
                  placement: dict[str, Any] | None = None) -> None:
    """metrics.json, and model.pt with the weights the reported test accuracy comes from."""
    identity = {
        "dataset": cfg.data.name, "model": cfg.model.name, "method": cfg.method.name, "engine": cfg.engine.name,
        "method_config": cfg.choices.get("method"), "engine_detail": engine_detail(cfg),
        "seed": cfg.seed, "profile": cfg.choices.get("profile"), "mlflow_run_id": run_id,
        "saved_weights": f"epoch {best.epoch}, the best validation accuracy",
        "environment": describe_environment(),
        **({"placement": placement} if placement else {}),
    }
    (out_dir / "metrics.json").write_text(json.dumps({**identity, **summary}, indent=2) + "\n")
    torch.save({"epoch": best.epoch, "units": best.modules}, out_dir / "model.pt")


def run(cfg: DictConfig, listeners: Sequence[TrainingListener] = ()) -> dict[str, float]:
    """Train one configuration end to end; returns the final metrics (see trainer.summarize).

    `listeners` hear every epoch's metrics (a sweep's pruner is one); one may raise TrainingStopped.
    Under a multi-process engine every process calls this; only the main one logs and writes.
    Everything that can be checked without training is checked before the first step."""
    check_values(cfg)
    check_devices(cfg)
    OptimizerSettings.from_config(cfg.optimizer).check_run(cfg.trainer.epochs)
    configure_torch(cfg.trainer.threads, cfg.trainer.deterministic, cfg.trainer.get("tf32", False))
    data = load_data(cfg)
    check_batch_fits(cfg, data.meta["sizes"]["train"])
    check_augmentation_fits(cfg, data.meta.get("modality", "image"))
    recipe = update_recipe(cfg, data)
    model, units = build(cfg, data)
    engine = build_engine(cfg.engine.name, **options(cfg.engine))
    try:
        engine.setup(units, model.example_batch(cfg.trainer.batch_size, data.num_classes), recipe)
        return train_with(cfg, data, engine, listeners, modules=len(units))
    finally:
        engine.close()


def run_name(cfg: DictConfig, modules: int | None) -> str:
    """What tells a run apart from its neighbours in the runs list: data, model, the method's config
    file (contsup_r1e, not contsup), K gradient-isolated modules (BP: 1), engine and seed."""
    method = cfg.choices.get("method") or cfg.method.name
    k = f"k{modules}-" if modules else ""
    return f"{cfg.data.name}-{cfg.model.name}-{method}-{k}{cfg.engine.name}-s{cfg.seed}"


def start_tracking(tracker: MlflowTracker, cfg: DictConfig, data: PreparedData, resumed_run_id: str | None, modules: int | None) -> str:
    if resumed_run_id is not None:
        return tracker.start("", {}, {}, run_id=resumed_run_id)
    tags = {**run_tags(cfg), **({"modules": str(modules)} if modules else {})}
    run_id = tracker.start(cfg.tracking.run_name or run_name(cfg, modules), flatten(to_container(cfg)), tags)
    tracker.log_dataset(cfg.data.name, dataset_digest(data.meta), str(Path(cfg.data.processed_dir).resolve() / cfg.data.name), {
        "splits": data.meta["sizes"], "num_classes": data.num_classes, "input_shape": list(data.input_shape), "source": data.meta.get("source"),
    })
    return run_id


def dataset_digest(meta: dict[str, Any]) -> str:
    """16 hex digits over the prepared files' own checksums (meta.json): equal exactly when the data is."""
    return hashlib.sha256(json.dumps(meta["sha256"], sort_keys=True).encode()).hexdigest()[:16]


def train_with(cfg: DictConfig, data: PreparedData, engine: Engine, listeners: Sequence[TrainingListener], modules: int | None = None) -> dict[str, float]:
    """Train on a set-up engine, record the run (`modules`: how many units the method made, for its name)."""
    out_dir = Path(cfg.out_dir)
    tracker = None
    if engine.is_main:  # the only process that writes and logs; checked before a run opens
        check_writable_dir(out_dir, "out_dir")
        check_writable_dir(cfg.trainer.checkpoint_dir, "trainer.checkpoint_dir")
        tracker = MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment) if cfg.tracking.enabled else None  # checks its store
    if cfg.trainer.get("measure"):
        engine.measure_steps(cfg.trainer.get("measure_memory_steps", MEMORY_STEPS))
    checkpoint = Checkpoint(Path(cfg.trainer.checkpoint_dir) / f"{run_key(cfg)}.pt")
    state = checkpoint.load() if cfg.trainer.resume else None
    if state is not None:
        engine.load_training_state(state["units"])
        log.info("resuming from %s after epoch %d", checkpoint.path, state["epoch"])
    trainer = Trainer(
        engine, data, cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.eval_batch_size,
        Augmentation(cfg.trainer.augmentation, data.input_shape[-1], cfg.data.get("hflip", False)), cfg.seed,
        progress=cfg.trainer.progress, listeners=[*([tracker] if tracker else []), *(listeners if engine.is_main else [])],
        checkpoint=checkpoint, eval_test=cfg.trainer.eval_test, best=(state or {}).get("best") or BestWeights(),
        stop_at_val_acc=cfg.trainer.get("stop_at_val_acc"), steps_per_epoch=cfg.trainer.get("steps_per_epoch"),
        num_workers=cfg.data.get("num_workers") or 0,
    )
    history = state["history"] if state else []
    try:
        if tracker is not None:
            trainer.run_id = start_tracking(tracker, cfg, data, state and state["run_id"], modules)
            tracker.watch_system(cfg.tracking.get("system_metrics_s"))
        history = trainer.fit(start_epoch=len(history) + 1, history=history)
        summary = summarize(history)
        if engine.is_main:
            write_outputs(out_dir, cfg, history)
            write_results(out_dir, cfg, summary, trainer.best, trainer.run_id, engine.placement())
        if tracker is not None:
            # Their own names: logged as `test_acc` at step = epochs they would draw a false last point on the per-epoch charts.
            tracker.log_metrics({f"summary/{name}": value for name, value in summary.items()})
            for name in ("config.yaml", "metrics.json", "history.csv"):
                tracker.log_file(out_dir / name)
    except BaseException as error:
        if tracker is not None and tracker.run_id is not None:
            end_tracked_run(tracker, error)
        if engine.is_main:
            keep_partial_history(out_dir, cfg, checkpoint, history)
        if isinstance(error, TrainingStopped) and engine.is_main:
            checkpoint.remove()  # stopped on purpose: there is nothing to resume
        raise
    if tracker is not None:
        tracker.set_tag("outcome", "completed")
        tracker.finish()
        log.info("MLflow run: %s (serve a local store with `make ui`)", tracker.link)
    if engine.is_main:
        checkpoint.remove()  # the run is complete; its outputs hold everything the checkpoint did
    return summary


def end_tracked_run(tracker: MlflowTracker, error: BaseException) -> None:
    """Every way a run can end is recorded: stopped on purpose (a pruned trial ends FINISHED, tagged
    `outcome=pruned`), interrupted (KILLED) or failed (FAILED), with the reason as a tag."""
    if isinstance(error, TrainingStopped):
        outcome, status = error.outcome, error.run_status
    else:
        # SystemExit: how submitit ends a job that Slurm preempts or times out, before requeueing it.
        outcome, status = ("killed", "KILLED") if isinstance(error, (KeyboardInterrupt, SystemExit)) else ("failed", "FAILED")
    reason = str(error)[:5000] or type(error).__name__
    if isinstance(error, SystemExit):
        reason = f"the process was told to exit (SystemExit {error.code}), as submitit does before Slurm requeues a job; a requeued job resumes this run"
    try:
        tracker.set_tag("outcome", outcome)
        tracker.set_tag("error" if status == "FAILED" else "stopped", reason)
    finally:
        tracker.finish(status)


def keep_partial_history(out_dir: Path, cfg: DictConfig, checkpoint: Checkpoint, fallback: list[dict[str, float]]) -> None:
    """The epochs finished before a failure (the checkpoint has them even when fit() did not return).
    Best effort: the error being raised is the one to report."""
    try:
        state = checkpoint.load()
        write_outputs(out_dir, cfg, state["history"] if state else fallback)
    except Exception as error:
        log.warning("could not write the partial history to %s: %s", out_dir, error)


def launch_local(processes: int, overrides: Sequence[str]) -> int:
    """`engine.processes=N` outside torchrun: this same command as N ranks on this machine, started as
    torchrun --standalone would (engines/launch.py says why not torchrun itself). Several machines: run
    torchrun on each yourself. Returns the first failed rank's exit status (0: all succeeded)."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    log.info("starting %d processes: python -m scpl_kit.train %s", processes, shlex.join(overrides))
    try:
        start_local(rank_main, processes, (list(overrides),))
    except ProcessExitedException as error:
        return error.exit_code or 1
    except ProcessRaisedException as error:  # an unexpected error (user errors exit 2, their line printed by the rank)
        print(f"error: a rank failed:\n{error}", file=sys.stderr)
        return 1
    return 0


def rank_main(overrides: list[str]) -> None:
    """One rank of `launch_local`: the command's own entry point, its exit status the rank's."""
    code = main(overrides)
    if code:
        sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m scpl_kit.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: group=option or key=value")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    args = parser.parse_args(argv)
    main_process = int(os.environ.get("RANK", 0)) == 0  # under torchrun, one process speaks for the job
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = None
    try:
        refuse_passwords(args.overrides)
        cfg = compose_config(args.overrides)
        refuse_passwords([f"tracking.uri={cfg.tracking.uri}"])  # nor in a config file ($MLFLOW_TRACKING_URI may hold one)
        if args.cfg:
            print(OmegaConf.to_yaml(cfg))
            return 0
        if cfg.engine.get("processes") and "RANK" not in os.environ:
            return launch_local(int(cfg.engine.processes), args.overrides)
        summary = run(cfg)
    except LaunchError as error:
        stages = len(cfg.engine.get("stages") or []) or 2
        command = " ".join(["torchrun", "--nproc-per-node", str(stages), "-m", "scpl_kit.train", *map(shlex.quote, args.overrides)])
        print(f"error: {error}; run: {command} (or add engine.processes={stages} to start them on this machine)", file=sys.stderr)
        return 2
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if main_process:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
