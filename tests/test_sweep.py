"""Optuna sweeps on tiny real data: trials, pruning, failures, resume after a kill, parallel workers."""

import os
import shutil
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

from scpl_kit.config import compose_config
from scpl_kit.sweep import counted, load_sweep, main as sweep_main

from conftest import REPO

SPACE = {"method.temperature": {"type": "float", "low": 0.05, "high": 0.5, "log": True}, "trainer.lr": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True}}


@pytest.fixture
def sweep_env(tmp_path: Path, processed_dir: Path, monkeypatch) -> dict:
    """A copy of conf/ with a `tiny` study whose storage, MLflow store and outputs are all in tmp_path."""
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    study = yaml.safe_load((conf / "sweep" / "scpl_tau_lr.yaml").read_text())
    study.update(
        study_name="tiny", space=SPACE, n_trials=4, search_only=["trainer.epochs=2"], heartbeat_s=1,
        storage=f"sqlite:///{tmp_path / 'optuna.db'}", output_dir=str(tmp_path / "trials"), export_dir=str(conf / "method"),
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
    )
    (conf / "sweep" / "tiny.yaml").write_text(yaml.safe_dump(study))
    monkeypatch.setenv("SCPL_CONF_DIR", str(conf))
    overrides = [
        "sweep=tiny", "profile=smoke", f"data.processed_dir={processed_dir}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    return {"overrides": overrides, "storage": study["storage"], "mlflow": f"sqlite:///{tmp_path / 'mlflow.db'}", "conf": conf, "tmp": tmp_path}


def load(env: dict) -> optuna.Study:
    """The one study in the test's storage (named `tiny-<profile>-<config hash>`)."""
    (name,) = optuna.get_all_study_names(env["storage"])
    assert name.startswith("tiny-smoke-")
    return optuna.load_study(study_name=name, storage=env["storage"])


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
    assert cfg.trainer.lr == pytest.approx(best.params["trainer.lr"]) and cfg.trainer.epochs == 10  # search-only epochs not exported
    client = MlflowClient(sweep_env["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best.trainer.lr"] == str(best.params["trainer.lr"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "param_importances.png", "best.json", "tiny_best.yaml"} <= artifacts
    assert all(len(client.get_metric_history(c.info.run_id, "val_acc")) >= 1 for c in children)


def test_pruned_and_failed_trials_are_recorded_and_the_sweep_goes_on(sweep_env: dict) -> None:
    conf = sweep_env["conf"] / "sweep" / "tiny.yaml"
    study_cfg = yaml.safe_load(conf.read_text())
    study_cfg["space"] = {
        "trainer.lr": {"type": "categorical", "choices": [0.003, 1.0e-9]},
        "method.variant": {"type": "categorical", "choices": ["paper", "bogus"]},
    }
    study_cfg["n_trials"] = 3
    conf.write_text(yaml.safe_dump(study_cfg))
    name = load_sweep([*sweep_env["overrides"], "tracking.enabled=true"]).study_name
    study = optuna.create_study(study_name=name, storage=sweep_env["storage"], direction="maximize")
    study.enqueue_trial({"trainer.lr": 0.003, "method.variant": "paper"})   # learns
    study.enqueue_trial({"trainer.lr": 1.0e-9, "method.variant": "paper"})  # stays at chance: pruned after epoch 1
    study.enqueue_trial({"trainer.lr": 0.003, "method.variant": "bogus"})   # raises while building
    assert sweep_main([*sweep_env["overrides"], "tracking.enabled=true"]) == 0
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


@pytest.mark.slow
def test_killed_sweep_resumes_where_it_stopped(sweep_env: dict) -> None:
    worker = sweep_process(sweep_env, "tracking.enabled=false")
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            trials = load(sweep_env).trials
        except Exception:
            continue
        if sum(t.state == TrialState.COMPLETE for t in trials) >= 1 and any(t.state == TrialState.RUNNING for t in trials):
            break
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = {t.number: t.state for t in load(sweep_env).trials}
    assert TrialState.RUNNING in before.values()
    time.sleep(4)  # three missed heartbeats: the killed trial is now stale
    assert sweep_main([*sweep_env["overrides"], "tracking.enabled=false"]) == 0
    trials = load(sweep_env).trials
    for number, state in before.items():
        if state == TrialState.COMPLETE:
            assert trials[number].state == TrialState.COMPLETE  # finished work was kept, not redone
    killed = [t for t in trials if before.get(t.number) == TrialState.RUNNING]
    assert killed and all(t.state == TrialState.FAIL and "error" not in t.user_attrs for t in killed)
    assert len(counted(trials)) == 4
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4


@pytest.mark.slow
def test_two_workers_share_one_study(sweep_env: dict) -> None:
    workers = [sweep_process(sweep_env, "tracking.enabled=false", f"sweep.worker={k}") for k in (0, 1)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
    trials = load(sweep_env).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert len(counted(trials)) == 4
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4
    params = [tuple(sorted(t.params.items())) for t in counted(trials)]
    assert len(set(params)) == 4  # the workers' samplers did not draw the same trials


def test_a_sweep_cannot_select_on_test_accuracy(sweep_env: dict, capsys) -> None:
    assert sweep_main([*sweep_env["overrides"], "sweep.metric=test_acc"]) == 2
    assert "selects on validation only" in capsys.readouterr().err
    assert not (sweep_env["tmp"] / "optuna.db").exists()
