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
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import optuna
import psutil
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from scpl_kit.config import ConfigError, compose_config, project_root, to_container
from scpl_kit.databases import check_database, engine_options, redact, refuse_passwords
from scpl_kit.preflight import RULES, OneLineParser, Rule, check_augmentation_fits, check_batch_fits, check_output_dir, check_values, fail
from scpl_kit.tracking import MlflowTracker
from scpl_kit.train import USER_ERRORS, load_data, run, run_key
from scpl_kit.trainer import TrainingStopped

log = logging.getLogger("scpl_kit.sweep")
# Heartbeats are flagged experimental since Optuna 2.8, yet they are Optuna's only way to notice a
# killed worker's trial; the warning would print on every start.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
GROUPS = ("data", "model", "method", "engine", "trainer", "optimizer", "profile")
PARENT_RUN_ATTR = "mlflow_parent_run_id"
STORAGE_ENV = "SCPL_OPTUNA_STORAGE"  # the study's database when sweep.storage is null, e.g. on a cluster's workers
VALIDATION_METRICS = ("best_val_acc", "final_val_acc")  # from trainer.summarize; the test split stays unseen
DIRECTIONS = ("maximize", "minimize")
SPACE_TYPES = ("float", "int", "categorical")
# The study's own numbers (conf/sweep/*.yaml), checked as preflight.RULES checks a run's.
SWEEP_RULES = {
    "sweep.n_trials": Rule(int, low=1),
    "sweep.timeout_s": Rule(float, positive=True, nullable=True),
    "sweep.heartbeat_s": Rule(int, low=1),
    "sweep.worker": Rule(int, low=0),
    "sweep.sampler.seed": Rule(int, low=0, nullable=True),
    "sweep.pruner.n_startup_trials": Rule(int, low=0),
    "sweep.pruner.n_warmup_steps": Rule(int, low=0),
}


class Pruned(TrainingStopped):
    outcome = "pruned"
    run_status = "FINISHED"  # a normal end for a trial unlikely to beat the others, not a failure


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


def check_space(space: DictConfig, base: DictConfig) -> None:
    """Every searched key exists in a trial's config, and every value its entry can draw is one a run
    accepts (preflight.RULES): a space that cannot be met fails here, not as n_trials failed trials."""
    missing = object()
    for name, entry in space.items():
        where = f"sweep.space.{name}"
        kind = entry.get("type") if isinstance(entry, DictConfig) else None
        if kind not in SPACE_TYPES:
            raise ConfigError(f"{where}: type {kind!r}; valid types: {', '.join(SPACE_TYPES)}")
        key = str(name).lstrip("+~")
        if not str(name).startswith("+") and OmegaConf.select(base, key, default=missing) is missing:
            raise ConfigError(f"{where}: {key!r} is not a key of the training config (a new key needs a leading +)")
        rule = RULES.get(key)
        if kind == "categorical":
            choices = entry.get("choices")
            if not isinstance(choices, (list, ListConfig)) or not choices:
                raise ConfigError(f"{where}.choices: expected a non-empty list")
            values = list(choices)
        else:
            number = Rule(int if kind == "int" else float)
            low, high = entry.get("low"), entry.get("high")
            for bound, value in (("low", low), ("high", high)):
                if not number.accepts(value):
                    raise ConfigError(f"{where}.{bound}={value!r}: expected {number.describe()}")
            if low > high:
                raise ConfigError(f"{where}: low={low} is above high={high}")
            if entry.get("log", False) and low <= 0:
                raise ConfigError(f"{where}: log=true needs low > 0 (got {low})")
            step = entry.get("step")
            if step is not None and not (number.accepts(step) and step > 0):
                raise ConfigError(f"{where}.step={step!r}: expected {number.describe()} > 0")
            values = [low, high]
        for value in values:
            if rule is not None and not rule.accepts(value):
                raise ConfigError(f"{where} can draw {value!r}, but {key} expects {rule.describe()}")


def make_sampler(spec: DictConfig, worker: int, restart: int) -> optuna.samplers.BaseSampler:
    """Each worker, and each restart of it (`restart`: trials the study held when it started), gets its
    own seed: equal seeds would make parallel workers, or a resumed sweep, draw the same points again."""
    seed = None if spec.seed is None else int(np.random.SeedSequence([spec.seed, worker, restart]).generate_state(1)[0])
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed), "random": lambda: optuna.samplers.RandomSampler(seed=seed)}
    if spec.name not in samplers:
        raise ConfigError(f"sweep.sampler.name={spec.name!r}: unknown sampler; valid samplers: {', '.join(samplers)}")
    return samplers[spec.name]()


def make_pruner(spec: DictConfig, max_epochs: int) -> optuna.pruners.BasePruner:
    pruners = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3),
        "none": optuna.pruners.NopPruner,
    }
    if spec.name not in pruners:
        raise ConfigError(f"sweep.pruner.name={spec.name!r}: unknown pruner; valid pruners: {', '.join(pruners)}")
    return pruners[spec.name]()


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that used up the budget: finished, pruned or running ones, and those that failed by
    themselves. Not counted: queued trials (not started yet), trials whose worker was killed
    (`Sweep.reclaim` fails them and they are retried) and surplus trials."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) or "error" in t.user_attrs]


def worker_identity(trial: optuna.Trial) -> dict[str, Any]:
    """Enough to tell, on this host, whether the process that runs a trial is still alive (the pid
    alone could have been reused). The trial's id is part of it because a retried trial starts
    with a copy of the failed one's attributes, the dead worker's identity among them."""
    me = psutil.Process()
    return {"worker_host": socket.gethostname(), "worker_pid": me.pid, "worker_started": me.create_time(), "worker_trial": trial._trial_id}


def worker_is_dead(trial: FrozenTrial) -> bool:
    """True only when certain: this trial's process ran on this host and is gone."""
    attrs = trial.user_attrs
    if attrs.get("worker_host") != socket.gethostname() or attrs.get("worker_trial") != trial._trial_id:
        return False  # another host's, or not yet claimed by the worker that runs it
    try:
        # Within a second: psutil derives start times from the boot time, which moves when the clock is stepped.
        return abs(psutil.Process(attrs["worker_pid"]).create_time() - attrs["worker_started"]) > 1.0
    except psutil.NoSuchProcess:
        return True


def study_identity(spec: DictConfig, base: DictConfig) -> str:
    """`<study>-<profile>-<hash>`: the hash covers everything that changes what a trial measures
    (the composed training config, the search space and the metric), so a sweep on another profile
    or with other training overrides is another study rather than a continuation of this one."""
    defining = {"config": run_key(base), "space": to_container(spec.space), "metric": spec.metric, "direction": spec.direction}
    digest = run_key(OmegaConf.create(defining))[:8]
    return f"{spec.study_name}-{base.choices.profile}-{digest}"


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
        # A password may come from the environment, never from a config file (they are committed and logged).
        refuse_passwords([f"sweep.storage={self.spec.storage}", f"tracking.uri={cfg.tracking.uri}"])
        self.storage_url = self.spec.storage or os.environ.get(STORAGE_ENV) or default_storage()
        if self.spec.metric not in VALIDATION_METRICS:
            raise ConfigError(f"sweep.metric {self.spec.metric!r}: a search selects on validation only; valid metrics: {', '.join(VALIDATION_METRICS)}")
        check_values(cfg, SWEEP_RULES)
        if self.spec.direction not in DIRECTIONS:
            raise ConfigError(f"sweep.direction={self.spec.direction!r}; valid directions: {', '.join(DIRECTIONS)}")
        searched = {key for key in self.spec.space}
        clash = [o for o in train_overrides if o.split("=", 1)[0].lstrip("+~") in searched]
        if clash:
            raise ConfigError(f"{', '.join(clash)}: this key is searched by the study; drop it from the command line or from sweep.space")
        self.base = compose_config(self.fixed_overrides())  # a trial's config before its searched values
        # Before anything is created (the tracker checks its own store): bad values, a space, sampler or
        # pruner that cannot be used, folders that cannot be written, a storage that cannot be used.
        check_values(self.base)
        check_space(self.spec.space, self.base)
        self.check_data()
        make_sampler(self.spec.sampler, self.spec.worker, restart=0)
        make_pruner(self.spec.pruner, self.base.trainer.epochs)
        check_output_dir(self.spec.output_dir, "sweep.output_dir")
        check_output_dir(self.spec.export_dir, "sweep.export_dir")
        check_database(self.storage_url, "Optuna storage")
        self.study_name = study_identity(self.spec, self.base)

    def check_data(self) -> None:
        """The trials' prepared data is there and fits their batch, as train.run checks before its first step
        (without the checksums, which every trial verifies): else every trial would fail the same way."""
        data = load_data(OmegaConf.merge(self.base, {"data": {"verify_checksum": False}}))
        if "trainer.batch_size" not in self.spec.space:
            check_batch_fits(self.base, data.meta["sizes"]["train"])
        if "trainer.augmentation" not in self.spec.space:
            check_augmentation_fits(self.base, data.meta.get("modality", "image"))

    def fixed_overrides(self) -> list[str]:
        """The study's own settings first, so the command line wins (e.g. trainer.epochs over search_only)."""
        return [*self.spec.fixed, *self.spec.search_only, *self.train_overrides]

    def trial_overrides(self, trial: optuna.Trial) -> list[str]:
        return [*self.fixed_overrides(), *(f"{name}={suggest(trial, name, dict(spec))}" for name, spec in self.spec.space.items())]

    def objective(self, study: optuna.Study, trial: optuna.Trial) -> float:
        in_budget = sorted(t.number for t in counted(study.get_trials(deepcopy=False)))[: self.spec.n_trials]
        if trial.number not in in_budget:
            study.stop()
            raise SurplusTrial(f"trial {trial.number} is beyond the study's {self.spec.n_trials} trials")
        for key, value in worker_identity(trial).items():
            trial.set_user_attr(key, value)
        try:
            return self.evaluate(study, trial)
        except optuna.TrialPruned:
            raise
        except Exception as error:  # the trial's own failure: it counts, and the sweep goes on
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
            raise

    def evaluate(self, study: optuna.Study, trial: optuna.Trial) -> float:
        overrides = self.trial_overrides(trial)
        trial.set_user_attr("overrides", overrides)
        study_dir = Path(self.spec.output_dir) / study.study_name
        cfg = compose_config([
            *overrides, "trainer.eval_test=false", "trainer.resume=false", "trainer.progress=false",
            f"out_dir={study_dir / f'trial{trial.number}'}", f"trainer.checkpoint_dir={study_dir / 'checkpoints'}",
            f"tracking.run_name=trial{trial.number}-{study.study_name}",  # the number first: the UI cuts long names
            f"tracking.parent_run_id={study.user_attrs.get(PARENT_RUN_ATTR) or 'null'}",
            f"+tracking.tags.optuna_study={study.study_name}", f"+tracking.tags.optuna_trial={trial.number}",
        ])
        try:
            summary = run(cfg, listeners=[PruningListener(trial)])
        except Pruned as stop:
            raise optuna.TrialPruned(str(stop)) from None
        value = summary[self.spec.metric]
        if not math.isfinite(value):
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
                    engine_kwargs=engine_options(self.storage_url),
                )
            except Exception:  # workers started together race to create the tables; the loser retries
                if attempt == 4:
                    raise
                time.sleep(0.5 + attempt)
        raise AssertionError("unreachable")

    def open_study(self) -> optuna.Study:
        self.tracker = MlflowTracker(self.cfg.tracking.uri, self.cfg.tracking.experiment) if self.cfg.tracking.enabled else None
        self.storage = self.connect()
        options = dict(study_name=self.study_name, storage=self.storage, pruner=make_pruner(self.spec.pruner, self.base.trainer.epochs))
        try:
            study, created = optuna.create_study(direction=self.spec.direction, **options), True
        except optuna.exceptions.DuplicatedStudyError:
            study, created = optuna.load_study(**options), False
        study.sampler = make_sampler(self.spec.sampler, self.spec.worker, restart=len(study.get_trials(deepcopy=False)))
        if created:
            study.set_user_attr("profile", str(self.base.choices.profile))
        log.info("study %s in %s", study.study_name, redact(self.storage_url))
        if self.tracker is not None:
            self.ensure_parent_run(study, created)
        return study

    def ensure_parent_run(self, study: optuna.Study, created: bool) -> None:
        """One MLflow parent run per study. Its creator opens it; a worker that found the study
        waits a moment for it (workers are often started together) and opens it only if none comes."""
        for _ in range(0 if created else 20):
            if PARENT_RUN_ATTR in study.user_attrs:
                return
            time.sleep(0.25)
        tags = {"optuna_study": study.study_name, "optuna_storage": redact(self.storage_url), "sweep": "true", "config.profile": str(self.base.choices.profile)}
        params = {"metric": self.spec.metric, "direction": self.spec.direction, "n_trials": self.spec.n_trials, "space": json.dumps(to_container(self.spec.space))}
        study.set_user_attr(PARENT_RUN_ATTR, self.tracker.start(f"sweep-{study.study_name}", params, tags))

    def budget_spent(self, study: optuna.Study) -> bool:
        return len(counted(study.get_trials(deepcopy=False))) >= self.spec.n_trials

    def reclaim(self, study: optuna.Study) -> None:
        """Fail the trials whose worker is gone, so they are retried (RetryHeartbeatStaleTrialCallback)
        and stop counting: at once when the worker ran on this host and its process has ended, else
        once its heartbeat is stale. Their MLflow runs, left RUNNING by the kill, end as KILLED."""
        retry = self.storage.get_heartbeat_stale_trial_callback()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if worker_is_dead(trial):
                try:
                    failed = self.storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another worker got there first
                if failed:
                    log.info("trial %d: its worker (pid %s) is gone; failed and queued again", trial.number, trial.user_attrs["worker_pid"])
                    retry(study, self.storage.get_trial(trial._trial_id))
        optuna.storages.fail_stale_trials(study)
        if self.tracker is not None:
            orphans = self.tracker.running_runs(optuna_study=study.study_name)  # before the states: a trial starting meanwhile is not FAIL
            failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
            for run_id, tags in orphans:
                if int(tags.get("optuna_trial", -1)) in failed:
                    self.tracker.end_run(run_id, "KILLED", "its sweep worker was killed; the trial was failed and queued again")

    def run(self) -> optuna.Study:
        """Trials until the budget is spent and no trial runs anywhere: trials of killed workers are
        failed and retried here, so the study ends with exactly n_trials finished."""
        study = self.open_study()
        deadline = None if self.spec.timeout_s is None else time.monotonic() + self.spec.timeout_s
        while deadline is None or time.monotonic() < deadline:
            self.reclaim(study)
            if not self.budget_spent(study):
                study.optimize(
                    lambda trial: self.objective(study, trial), catch=(Exception,),
                    timeout=None if deadline is None else max(deadline - time.monotonic(), 0),
                    callbacks=[lambda s, _trial: self.budget_spent(s) and s.stop()],
                )
                continue
            running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
            if not running:
                break
            log.info("waiting for trial(s) %s of other workers (retried here if their worker died)", running)
            time.sleep(self.spec.heartbeat_s)
        self.finish(study)
        return study

    def finish(self, study: optuna.Study) -> None:
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        states = {s.name: sum(t.state == s for t in counted(study.trials)) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        log.info("study %s: %s", study.study_name, states)
        if not done:
            log.warning("no trial completed; nothing to export")
            if self.tracker is not None and PARENT_RUN_ATTR in study.user_attrs:
                self.tracker.end_run(study.user_attrs[PARENT_RUN_ATTR], "FAILED", f"no trial completed: {states}")
            return
        best = study.best_trial
        path = Path(self.spec.export_dir) / f"{self.spec.study_name}_best.yaml"
        provenance = {"study": study.study_name, "profile": str(self.base.choices.profile), "metric": self.spec.metric, "value": best.value, "trial": best.number}
        refusal = export_refusal(path, provenance, self.spec.direction)
        if refusal and not self.spec.overwrite:
            log.warning("not exported: %s; pass sweep.overwrite=true to replace it", refusal)
            path = None
        else:
            export_best(self.cfg, best, provenance, path)
            log.info("best trial %d: %s = %.4f %s → %s", best.number, self.spec.metric, best.value, best.params, path)
        if self.tracker is not None and PARENT_RUN_ATTR in study.user_attrs:
            report_to_parent(self.tracker, study, states, path)


def export_refusal(path: Path, new: dict[str, Any], direction: str) -> str | None:
    """Why the export must not replace `path` without sweep.overwrite: it came from another profile
    or metric, or it holds a better value, or its origin is unknown. None when it may."""
    if not path.is_file():
        return None
    old = (yaml.safe_load(path.read_text()) or {}).get("tuned_by")
    if not old:
        return f"{path} does not say which study it came from"
    if old.get("study") == new["study"]:
        return None  # the same study: its best only improves
    if (old.get("profile"), old.get("metric")) != (new["profile"], new["metric"]):
        return f"{path} holds study {old.get('study')} on profile {old.get('profile')} ({old.get('metric')} {old.get('value')}), not this one's {new['profile']}"
    better = new["value"] >= old["value"] if direction == "maximize" else new["value"] <= old["value"]
    return None if better else f"{path} holds a better {old['metric']} ({old['value']:.4f} > {new['value']:.4f}, study {old.get('study')})"


def export_best(cfg: DictConfig, best: FrozenTrial, provenance: dict[str, Any], path: Path) -> None:
    """Write the best trial as a method config, `conf/method/<study>_best.yaml`: the whole method
    node plus the other keys the trial set (say, optimizer.lr), and `tuned_by` (study, profile, metric,
    value, trial). `train method=<study>_best` and the DVC pipeline (`methods: [..., <study>_best]`
    in params.yaml) take it as is. Search-only and command-line overrides (say, fewer epochs) are left out."""
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
        f"# Best trial #{best.number} of Optuna study {provenance['study']!r} (profile {provenance['profile']}): "
        f"{cfg.sweep.metric} = {best.value:.4f}.\n"
        f"# Written by `python -m scpl_kit.sweep`; use it with `method={path.stem}`.\n"
    )
    body = {"tuned_by": provenance, "method": to_container(trial_cfg.method), **to_container(others)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))


def report_to_parent(tracker: MlflowTracker, study: optuna.Study, states: dict[str, int], exported: Path | None) -> None:
    """Best value and params (as metric, tags and JSON: MLflow params cannot change once logged,
    and a shared study's best moves while workers run), plus Optuna's plots as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    tracker.use_run(study.user_attrs[PARENT_RUN_ATTR])
    best = study.best_trial
    tracker.log_metrics({"best_value": best.value, **{f"n_{k.lower()}": v for k, v in states.items()}})
    for key, value in {"best_trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}}.items():
        tracker.set_tag(key, str(value))
    tracker.log_json({"value": best.value, "trial": best.number, "params": best.params, "states": states}, "best.json")
    if exported is not None:
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


def load_sweep(overrides: Sequence[str]) -> Sweep:
    """The sweep that `python -m scpl_kit.sweep <overrides>` runs: `sweep=<name>`, `sweep.*` keys, and
    training overrides that apply to every trial."""
    refuse_passwords(list(overrides))
    choice = [o for o in overrides if o.startswith("sweep=")]
    if len(choice) != 1:
        raise ConfigError(f"name the study once, with sweep=<name>, one of conf/sweep/*.yaml (got {' '.join(choice) or 'none'})")
    sweep_keys = [o for o in overrides if o.startswith("sweep.")]
    train_overrides = [o for o in overrides if not o.startswith("sweep")]
    cfg = compose_config([*train_overrides, f"+{choice[0]}", *sweep_keys])
    return Sweep(cfg, train_overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m scpl_kit.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="+", help="sweep=<name> (conf/sweep/<name>.yaml), sweep.* keys, and training overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        load_sweep(args.overrides).run()
    except USER_ERRORS as error:
        return fail(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
