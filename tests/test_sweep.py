"""Optuna sweeps on tiny real data: trials, pruning, failures, resume after a kill, parallel workers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from scpl_kit.config import ConfigError, compose_config
from scpl_kit.sweep import counted, export_refusal, load_sweep, main as sweep_main
from scpl_kit.databases import redact

from conftest import load_study as load


def test_four_trial_sweep_exports_best_and_nests_mlflow_runs(sweep_env: dict) -> None:
    assert sweep_main(sweep_env["overrides"]) == 0
    study = load(sweep_env)
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) + [t.state for t in study.trials].count(TrialState.PRUNED) == 4
    assert len(counted(study.trials)) == 4
    # Selection never saw the test split: no trial run computed a test accuracy.
    for trial_dir in (sweep_env["tmp"] / "trials" / "tiny").glob("trial*"):
        assert "test_acc" not in (trial_dir / "history.csv").read_text()
    # The exported best config composes as a method option and carries the best trial's values.
    best = study.best_trial
    cfg = compose_config(["method=tiny_best"])
    assert cfg.method.name == "scpl" and cfg.method.temperature == pytest.approx(best.params["method.temperature"])
    assert cfg.optimizer.lr == pytest.approx(best.params["optimizer.lr"]) and cfg.trainer.epochs == compose_config(["profile=offline"]).trainer.epochs  # search-only epochs not exported
    assert dict(cfg.tuned_by) == {"study": study.study_name, "profile": "smoke", "metric": "best_val_acc", "value": best.value, "trial": best.number}
    client = MlflowClient(sweep_env["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best.optimizer.lr"] == str(best.params["optimizer.lr"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "param_importances.png", "best.json", "tiny_best.yaml"} <= artifacts
    assert all(len(client.get_metric_history(c.info.run_id, "val_acc")) >= 1 for c in children)


def test_pruned_and_failed_trials_are_recorded_and_the_sweep_goes_on(sweep_env: dict) -> None:
    conf = sweep_env["conf"] / "sweep" / "tiny.yaml"
    study_cfg = yaml.safe_load(conf.read_text())
    study_cfg["space"] = {
        "optimizer.lr": {"type": "categorical", "choices": [0.003, 1.0e-9]},
        "method.variant": {"type": "categorical", "choices": ["paper", "bogus"]},
    }
    study_cfg["n_trials"] = 3
    conf.write_text(yaml.safe_dump(study_cfg))
    name = load_sweep([*sweep_env["overrides"], "tracking.enabled=true"]).study_name
    study = optuna.create_study(study_name=name, storage=sweep_env["storage"], direction="maximize")
    study.enqueue_trial({"optimizer.lr": 0.003, "method.variant": "paper"})   # learns
    study.enqueue_trial({"optimizer.lr": 1.0e-9, "method.variant": "paper"})  # stays at chance: pruned after epoch 1
    study.enqueue_trial({"optimizer.lr": 0.003, "method.variant": "bogus"})   # raises while building
    export = sweep_env["conf"] / "method" / "tiny_best.yaml"
    foreign = yaml.safe_dump({"tuned_by": {"study": "tiny-offline-0", "profile": "offline", "metric": "best_val_acc", "value": 0.98}})
    export.write_text(foreign)  # a better export from the default profile
    assert sweep_main([*sweep_env["overrides"], "tracking.enabled=true"]) == 0
    assert export.read_text() == foreign  # a smoke sweep does not replace it without sweep.overwrite=true
    trials = load(sweep_env).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert "bogus" in trials[2].user_attrs["error"]
    assert list(trials[1].intermediate_values) == [1]
    client = MlflowClient(sweep_env["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])
    trials_runs = sorted((r.data.tags["optuna_trial"], r.info.status, r.data.tags["outcome"]) for r in runs if "mlflow.parentRunId" in r.data.tags)
    # A pruned trial ends FINISHED, tagged as pruned: pruning is normal. The failing trial stopped before its run opened.
    assert trials_runs == [("0", "FINISHED", "completed"), ("1", "FINISHED", "pruned")]


def sweep_process(env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "scpl_kit.sweep", *env["overrides"], *extra],
        env={**os.environ, "SCPL_CONF_DIR": str(env["conf"])}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def open_trial_runs(env: dict, number: int) -> list:
    client = MlflowClient(env["mlflow"])
    experiment = client.get_experiment_by_name("scpl-kit")
    query = f"tags.optuna_trial = '{number}' and attributes.status = 'RUNNING'"
    return client.search_runs([experiment.experiment_id], query) if experiment else []


@pytest.mark.slow
def test_killed_sweep_resumes_without_losing_or_repeating_a_trial(sweep_env: dict) -> None:
    """Kill a worker during a trial, start it again: the killed trial is failed and retried at once
    (its process is gone), its MLflow run ends KILLED, the study ends with exactly n_trials finished,
    and no point is evaluated twice. (A worker killed on another machine, found by its stale
    heartbeat: tests/test_cluster.py, on PostgreSQL.)"""
    tracking = [f"tracking.uri={sweep_env['mlflow']}", "sweep.heartbeat_s=30"]  # long before a 90 s heartbeat could expire
    worker = sweep_process(sweep_env, *tracking)
    deadline = time.time() + 240
    while time.time() < deadline:  # until a trial after the first is inside training, its MLflow run open
        time.sleep(0.5)
        try:
            trials = load(sweep_env).trials
        except Exception:
            continue
        running = [t.number for t in trials if t.state == TrialState.RUNNING]
        if sum(t.state == TrialState.COMPLETE for t in trials) >= 1 and running and open_trial_runs(sweep_env, running[0]):
            break
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    study = load(sweep_env)
    before = {t.number: t.state for t in study.trials}
    assert TrialState.RUNNING in before.values()
    started = time.time()
    assert sweep_main([*sweep_env["overrides"], *tracking]) == 0
    assert time.time() - started < 200
    trials = load(sweep_env).trials
    for number, state in before.items():
        if state == TrialState.COMPLETE:
            assert trials[number].state == TrialState.COMPLETE  # finished work was kept, not redone
    killed = [t for t in trials if before.get(t.number) == TrialState.RUNNING]
    assert killed and all(t.state == TrialState.FAIL and "error" not in t.user_attrs for t in killed)
    first_new = min(t.datetime_start for t in trials if t.number not in before)
    assert all(t.datetime_complete <= first_new for t in killed)  # failed when the sweep restarted, not at its end
    retried = [t for t in trials if t.system_attrs.get("failed_trial") in {k.number for k in killed}]
    assert retried and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in retried)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(counted(trials)) == 4
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 4  # the restarted sampler drew new points
    client = MlflowClient(sweep_env["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}
    killed_runs = [r for r in runs if r.data.tags.get("optuna_trial") in {str(k.number) for k in killed}]
    assert killed_runs and all(r.info.status == "KILLED" and "killed" in r.data.tags["stopped"] for r in killed_runs)


def test_a_sweep_cannot_select_on_test_accuracy(sweep_env: dict, capsys) -> None:
    assert sweep_main([*sweep_env["overrides"], "sweep.metric=test_acc"]) == 2
    assert "selects on validation only" in capsys.readouterr().err
    assert not (sweep_env["tmp"] / "optuna.db").exists()


def test_study_identity_follows_what_a_trial_measures(sweep_env: dict) -> None:
    name = load_sweep(sweep_env["overrides"]).study_name
    assert name.startswith("tiny-smoke-")
    assert load_sweep([*sweep_env["overrides"], "tracking.uri=sqlite:///elsewhere.db"]).study_name == name  # where it logs: same study
    assert load_sweep([*sweep_env["overrides"], "sweep.n_trials=8"]).study_name == name  # a larger budget continues it
    assert load_sweep([*sweep_env["overrides"], "trainer.epochs=3"]).study_name != name
    assert load_sweep([*sweep_env["overrides"], "profile=offline"]).study_name.startswith("tiny-offline-")


def test_the_command_line_wins_over_the_study_and_searched_keys_are_refused(sweep_env: dict) -> None:
    assert load_sweep(sweep_env["overrides"]).base.trainer.epochs == 2  # the study's search_only
    assert load_sweep([*sweep_env["overrides"], "trainer.epochs=1"]).base.trainer.epochs == 1
    with pytest.raises(ConfigError, match="optimizer.lr=0.1: this key is searched by the study"):
        load_sweep([*sweep_env["overrides"], "optimizer.lr=0.1"])


def test_an_export_replaces_only_what_it_may(tmp_path: Path) -> None:
    path = tmp_path / "tiny_best.yaml"
    new = {"study": "tiny-offline-abcd", "profile": "offline", "metric": "best_val_acc", "value": 0.97, "trial": 3}

    def existing(**tuned_by) -> Path:
        path.write_text(yaml.safe_dump({"tuned_by": tuned_by} if tuned_by else {"method": {"name": "scpl"}}))
        return path

    assert export_refusal(tmp_path / "absent.yaml", new, "maximize") is None
    assert "does not say which study" in export_refusal(existing(), new, "maximize")
    assert "on profile smoke" in export_refusal(existing(**{**new, "study": "tiny-smoke-1234", "profile": "smoke", "value": 0.5}), new, "maximize")
    assert "holds a better best_val_acc (0.9800 > 0.9700" in export_refusal(existing(**{**new, "study": "other", "value": 0.98}), new, "maximize")
    assert export_refusal(existing(**{**new, "study": "other", "value": 0.96}), new, "maximize") is None
    assert export_refusal(existing(**{**new, "value": 0.99}), new, "maximize") is None  # the same study's best


def test_urls_are_redacted_before_they_are_logged() -> None:
    assert redact("postgresql+psycopg://optuna:s3cret@db.example:5432/studies") == "postgresql+psycopg://optuna:***@db.example:5432/studies"
    assert redact("http://user:pw@mlflow:5000") == "http://user:***@mlflow:5000"
    assert redact("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"
