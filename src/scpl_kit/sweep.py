"""Hyper-parameter sweeps with Optuna, driven directly (the Hydra Optuna sweeper is stuck on Optuna 2).

    python -m scpl_kit.sweep sweep=scpl_tau_lr [sweep.n_trials=8] [any training override ...]

The study is a config in conf/sweep/. Every trial composes the training config with its own
overrides and trains through `train.run`; the objective is a validation metric (the test split is
never evaluated). Studies live in an RDB storage (sqlite in the repo by default, any SQLAlchemy URL
works), so a killed sweep resumes and several workers, on one machine or many, share one study.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import optuna
import yaml
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from scpl_kit.config import ConfigError, compose_config, project_root, to_container
from scpl_kit.tracking import MlflowTracker
from scpl_kit.train import USER_ERRORS, run
from scpl_kit.trainer import TrainingStopped

log = logging.getLogger("scpl_kit.sweep")
# Heartbeats are flagged experimental since Optuna 2.8, yet they are Optuna's only way to notice a
# killed worker's trial; the warning would print on every start.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
GROUPS = ("data", "model", "method", "engine", "trainer", "profile")
PARENT_RUN_ATTR = "mlflow_parent_run_id"
VALIDATION_METRICS = ("best_val_acc", "final_val_acc")  # from trainer.summarize; the test split stays unseen


class Pruned(TrainingStopped):
    pass


class SurplusTrial(Exception):
    """Another worker already took the last trial of the budget."""


def default_storage() -> str:
    return f"sqlite:///{project_root() / 'optuna.db'}"


def suggest(trial: optuna.Trial, name: str, spec: dict[str, Any]) -> Any:
    kind = spec["type"]
    if kind == "float":
        return trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step"))
    if kind == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step", 1))
    if kind == "categorical":
        return trial.suggest_categorical(name, list(spec["choices"]))
    raise ConfigError(f"search space entry {name!r} has type {kind!r}; valid types: float, int, categorical")


def make_sampler(spec: DictConfig, worker: int) -> optuna.samplers.BaseSampler:
    # Each worker gets its own seed: equal seeds would make parallel workers draw the same trials.
    seed = None if spec.seed is None else spec.seed + worker
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed), "random": lambda: optuna.samplers.RandomSampler(seed=seed)}
    if spec.name not in samplers:
        raise ConfigError(f"unknown sampler {spec.name!r}; valid samplers: {', '.join(samplers)}")
    return samplers[spec.name]()


def make_pruner(spec: DictConfig, max_epochs: int) -> optuna.pruners.BasePruner:
    pruners = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3),
        "none": optuna.pruners.NopPruner,
    }
    if spec.name not in pruners:
        raise ConfigError(f"unknown pruner {spec.name!r}; valid pruners: {', '.join(pruners)}")
    return pruners[spec.name]()


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that used up the budget: finished, pruned or running ones, and those that failed by
    themselves. Not counted: queued trials (not started yet), trials whose worker was killed
    (Optuna's heartbeat marks them failed and they are retried) and surplus trials."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) or "error" in t.user_attrs]


class PruningListener:
    """Reports validation accuracy to the trial after each epoch and stops the run when told to."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.trial.report(metrics["val_acc"], epoch)
        if self.trial.should_prune():
            raise Pruned(f"pruned by Optuna after epoch {epoch} (val_acc {metrics['val_acc']:.4f})")


class Sweep:
    def __init__(self, cfg: DictConfig, train_overrides: list[str]) -> None:
        self.cfg = cfg
        self.spec = cfg.sweep
        self.train_overrides = train_overrides  # from the command line; they apply to every trial
        self.storage_url = self.spec.storage or default_storage()
        if self.spec.metric not in VALIDATION_METRICS:
            raise ConfigError(f"sweep.metric {self.spec.metric!r}: a search selects on validation only; valid metrics: {', '.join(VALIDATION_METRICS)}")

    def trial_overrides(self, trial: optuna.Trial) -> list[str]:
        params = [f"{name}={suggest(trial, name, dict(spec))}" for name, spec in self.spec.space.items()]
        return [*self.train_overrides, *self.spec.fixed, *self.spec.search_only, *params]

    def objective(self, study: optuna.Study, trial: optuna.Trial) -> float:
        in_budget = sorted(t.number for t in counted(study.get_trials(deepcopy=False)))[: self.spec.n_trials]
        if trial.number not in in_budget:
            study.stop()
            raise SurplusTrial(f"trial {trial.number} is beyond the study's {self.spec.n_trials} trials")
        overrides = self.trial_overrides(trial)
        trial.set_user_attr("overrides", overrides)
        study_dir = Path(self.spec.output_dir) / study.study_name
        try:
            cfg = compose_config([
                *overrides, "trainer.eval_test=false", "trainer.resume=false", "trainer.progress=false",
                f"out_dir={study_dir / f'trial{trial.number}'}", f"trainer.checkpoint_dir={study_dir / 'checkpoints'}",
                f"tracking.run_name={study.study_name}-trial{trial.number}",
                f"tracking.parent_run_id={study.user_attrs.get(PARENT_RUN_ATTR) or 'null'}",
            ])
            summary = run(cfg, listeners=[PruningListener(trial)])
        except Pruned as stop:
            raise optuna.TrialPruned(str(stop)) from None
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
            raise
        value = summary[self.spec.metric]
        if not math.isfinite(value):
            trial.set_user_attr("error", f"{self.spec.metric} is {value}")
            raise FloatingPointError(f"{self.spec.metric} is {value}")
        return value

    def connect(self) -> optuna.storages.RDBStorage:
        """The study's storage, with heartbeats so a killed worker's trial is failed and retried."""
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(
                    self.storage_url,
                    heartbeat_interval=self.spec.heartbeat_s,
                    grace_period=3 * self.spec.heartbeat_s,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
                    engine_kwargs={"connect_args": {"timeout": 60}} if self.storage_url.startswith("sqlite") else None,
                )
            except Exception:  # workers started together race to create the tables; the loser retries
                if attempt == 4:
                    raise
                time.sleep(0.5 + attempt)
        raise AssertionError("unreachable")

    def open_study(self) -> optuna.Study:
        storage = self.connect()
        options = dict(
            study_name=self.spec.study_name, storage=storage, direction=self.spec.direction,
            sampler=make_sampler(self.spec.sampler, self.spec.worker), pruner=make_pruner(self.spec.pruner, self.cfg.trainer.epochs),
        )
        try:
            study, created = optuna.create_study(**options), True
        except optuna.exceptions.DuplicatedStudyError:
            study, created = optuna.load_study(**{k: v for k, v in options.items() if k != "direction"}), False
        if self.cfg.tracking.enabled:
            self.ensure_parent_run(study, created)
        return study

    def ensure_parent_run(self, study: optuna.Study, created: bool) -> None:
        """One MLflow parent run per study. Its creator opens it; a worker that found the study
        waits a moment for it (workers are often started together) and opens it only if none comes."""
        for _ in range(0 if created else 20):
            if PARENT_RUN_ATTR in study.user_attrs:
                return
            time.sleep(0.25)
        tracker = MlflowTracker(self.cfg.tracking.uri, self.cfg.tracking.experiment)
        tags = {"optuna_study": study.study_name, "optuna_storage": self.storage_url, "sweep": "true"}
        params = {"metric": self.spec.metric, "direction": self.spec.direction, "n_trials": self.spec.n_trials, "space": json.dumps(to_container(self.spec.space))}
        study.set_user_attr(PARENT_RUN_ATTR, tracker.start(f"sweep-{study.study_name}", params, tags))

    def budget_spent(self, study: optuna.Study) -> bool:
        return len(counted(study.get_trials(deepcopy=False))) >= self.spec.n_trials

    def run(self) -> optuna.Study:
        study = self.open_study()
        if not self.budget_spent(study):
            study.optimize(
                lambda trial: self.objective(study, trial), timeout=self.spec.timeout_s,
                catch=(Exception,), callbacks=[lambda s, _trial: self.budget_spent(s) and s.stop()],
            )
        self.finish(study)
        return study

    def finish(self, study: optuna.Study) -> None:
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        states = {s.name: sum(t.state == s for t in counted(study.trials)) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        log.info("study %s: %s", study.study_name, states)
        if not done:
            log.warning("no trial completed; nothing to export")
            return
        best = study.best_trial
        path = export_best(self.cfg, best, study.study_name, Path(self.spec.export_dir))
        log.info("best trial %d: %s = %.4f %s → %s", best.number, self.spec.metric, best.value, best.params, path)
        if self.cfg.tracking.enabled and PARENT_RUN_ATTR in study.user_attrs:
            report_to_parent(self.cfg, study, states, path)


def export_best(cfg: DictConfig, best: FrozenTrial, study_name: str, export_dir: Path) -> Path:
    """Write the best trial as a method config, `conf/method/<study>_best.yaml`: the whole method
    node plus the other keys the trial set (say, trainer.lr). `train method=<study>_best` and the
    DVC pipeline (`methods: [..., <study>_best]` in params.yaml) take it as is. Search-only
    overrides (say, fewer epochs) are left out."""
    trial_cfg = compose_config(best.user_attrs["overrides"])
    search_only = {o.split("=", 1)[0] for o in cfg.sweep.search_only}
    others = OmegaConf.create()
    for override in [*cfg.sweep.fixed, *(f"{k}={v}" for k, v in best.params.items())]:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in search_only or key == "method" or key.startswith("method."):
            continue  # the method node is exported whole below
        if key in GROUPS:
            raise ConfigError(f"cannot export the group choice {override!r}: a method config can set keys, not choose other groups")
        OmegaConf.update(others, key, OmegaConf.select(trial_cfg, key), force_add=True)
    header = (
        "# @package _global_\n"
        f"# Best trial #{best.number} of Optuna study {study_name!r}: {cfg.sweep.metric} = {best.value:.4f}.\n"
        f"# Written by `python -m scpl_kit.sweep`; use it with `method={study_name}_best`.\n"
    )
    export_dir.mkdir(parents=True, exist_ok=True)
    path = export_dir / f"{study_name}_best.yaml"
    path.write_text(header + yaml.safe_dump({"method": to_container(trial_cfg.method), **to_container(others)}, sort_keys=False))
    return path


def report_to_parent(cfg: DictConfig, study: optuna.Study, states: dict[str, int], exported: Path) -> None:
    """Best value and params (as metric, tags and JSON: MLflow params cannot change once logged,
    and a shared study's best moves while workers run), plus Optuna's plots as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    tracker = MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment)
    tracker.use_run(study.user_attrs[PARENT_RUN_ATTR])
    best = study.best_trial
    tracker.log_metrics({"best_value": best.value, **{f"n_{k.lower()}": v for k, v in states.items()}})
    for key, value in {"best_trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}}.items():
        tracker.set_tag(key, str(value))
    tracker.log_json({"value": best.value, "trial": best.number, "params": best.params, "states": states}, "best.json")
    tracker.log_file(exported)
    plots = {"optimization_history.png": optuna_plots.plot_optimization_history, "param_importances.png": optuna_plots.plot_param_importances}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, plot in plots.items():
            try:
                plot(study)
            except Exception as error:  # importances need ≥ 2 completed trials with varied params
                log.warning("no %s: %s", name, error)
                continue
            plt.gcf().set_size_inches(7, 4.5)
            plt.tight_layout()
            plt.savefig(folder / name, dpi=110)
            plt.close("all")
            tracker.log_file(folder / name)
    tracker.finish()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scpl_kit.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="+", help="sweep=<name> (conf/sweep/<name>.yaml), sweep.* keys, and training overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    choice = [o for o in args.overrides if o.startswith("sweep=")]
    if not choice:
        print("error: name the study with sweep=<name>, one of conf/sweep/*.yaml", file=sys.stderr)
        return 2
    sweep_keys = [o for o in args.overrides if o.startswith("sweep.")]
    train_overrides = [o for o in args.overrides if not o.startswith("sweep")]
    try:
        cfg = compose_config([*train_overrides, f"+{choice[0]}", *sweep_keys])
        Sweep(cfg, train_overrides).run()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
