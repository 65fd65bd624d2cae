"""MLflow: the one module that knows it. The trainer calls a tracker through three hooks."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from scpl_kit.config import project_root
from scpl_kit.databases import CONNECT_TIMEOUT_S, check_database, redact
from scpl_kit.preflight import PreflightError

UI_ADDRESS = "http://127.0.0.1:5000"  # where `make ui` serves a local sqlite store


class TrainingListener(Protocol):
    """What the trainer reports to; MLflow is one listener, a sweep's pruner another."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else an *absolute* sqlite file in the repo (a relative one would fork a
    new database inside every DVC experiment copy; the plain-folder store is deprecated)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def check_tracking_store(uri: str) -> None:
    """Fail in seconds, naming the store, where MLflow itself would retry for minutes and then print
    tracebacks: a server must answer /health; a database (sqlite, PostgreSQL) must be usable."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT_S) as answer:
                answer.read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise PreflightError(
                f"MLflow tracking server {redact(uri)} does not answer ({reason}); start it, or unset "
                "MLFLOW_TRACKING_URI (and tracking.uri) to record into the local sqlite file"
            ) from None
    elif uri.startswith(("sqlite:///", "postgresql", "mysql", "mssql")):
        check_database(uri, "MLflow store")


def open_store_once(uri: str | None, experiment: str) -> None:
    """Create the store and the experiment before several processes open them at once: two processes
    creating one sqlite store race in MLflow's schema migration (alembic: "Online migration expected
    to match one row"), and two creating one experiment in its unique name."""
    MlflowTracker(uri, experiment)


def ui_link(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """A run, or the experiment's runs, in MLflow's classic (model training) view: without
    `workflowType`, 3.17 opens its GenAI traces view. A server URI is its own UI's address."""
    base = redact(uri.rstrip("/")) if uri.startswith(("http://", "https://")) else UI_ADDRESS
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=project_root()).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class MlflowTracker:
    """One MLflow run: params from the resolved config, per-epoch metrics, final metrics, artifacts."""

    def __init__(self, uri: str | None, experiment: str) -> None:
        from mlflow import MlflowClient  # imported here: MLflow takes seconds to import

        self.uri = uri or default_tracking_uri()
        check_tracking_store(self.uri)
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            # With the sqlite default, artifacts go next to the database rather than into whatever
            # folder the first run happened to start from.
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() if self.uri.startswith("sqlite:///") else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self.run_id: str | None = None
        self.monitor: Any = None  # MLflow's system metrics sampler, while a run is open

    def watch_system(self, interval_s: float | None) -> None:
        """Log MLflow's own system metrics into the open run every `interval_s` seconds (`system/...`:
        CPU, memory, disk, network, and GPU utilisation and memory through pynvml where there is a GPU),
        so a starved GPU shows beside the run's samples/s. None: off."""
        if not interval_s:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, tracking_uri=self.uri)
        self.monitor.start()

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None) -> str:
        """Open a new run, or reopen `run_id` (a resumed training continues its run)."""
        from mlflow.entities import Param

        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        # Redacted: a URL in the config (tracking.uri, a sweep's storage) may carry a password.
        items = [Param(key, redact(str(value))[:6000]) for key, value in sorted(params.items())]  # MLflow caps a param at 6000 chars
        for start in range(0, len(items), 100):  # and a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start : start + 100])
        return self.run_id

    @property
    def link(self) -> str:
        return ui_link(self.uri, self.experiment_id, self.run_id)

    def use_run(self, run_id: str) -> None:
        """Log into an existing run without changing its status (evaluation after training)."""
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log_metrics(metrics, step=epoch)

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any], context: str = "training") -> None:
        """The prepared data as the run's MLflow dataset input: the runs view's Datasets column shows
        `name (digest)`, so runs trained on different preparations of one dataset look different."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from mlflow.exceptions import MlflowException

        dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}), profile=json.dumps(profile))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        try:
            self.client.log_inputs(self.run_id, inputs)
        except MlflowException:
            # MLflow's SQL store looks the dataset up, then inserts it: two runs of one experiment
            # starting together (the repro pool) may both insert, and the second breaks the unique
            # key. By now the dataset exists, so the second try only links it to this run.
            self.client.log_inputs(self.run_id, inputs)

    def log_json(self, data: dict[str, Any], name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, default=str), name)

    def log_file(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self.monitor is not None:
            self.monitor.finish()  # its last samples are written while the run is still open
            self.monitor = None
        self.client.set_terminated(self.run_id, status=status)

    def running_runs(self, **tags: str) -> list[tuple[str, dict[str, str]]]:
        """(run id, tags) of this experiment's RUNNING runs that carry all of `tags`."""
        query = " and ".join([*(f"tags.{key} = '{value}'" for key, value in tags.items()), "attributes.status = 'RUNNING'"])
        return [(found.info.run_id, found.data.tags) for found in self.client.search_runs([self.experiment_id], query)]

    def end_run(self, run_id: str, status: str, reason: str) -> None:
        """End another run (one whose process died), saying why."""
        self.client.set_tag(run_id, "stopped", reason)
        self.client.set_terminated(run_id, status=status)
