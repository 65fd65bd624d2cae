"""The cluster path against real servers on this machine: sweep workers sharing one Optuna study on
PostgreSQL and one MLflow server backed by it, Slurm jobs through submitit (training across ranks,
preempted and requeued; sweep workers), and the ways it fails: an unreachable database, a password
where it does not belong, a killed worker."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from scpl_kit.config import compose_config
from scpl_kit.submit import main as submit_main, make_executor, submit_training
from scpl_kit.sweep import counted, main as sweep_main
from scpl_kit.train import main as train_main

from conftest import load_study
from services import MlflowServer, Postgres, free_port

needs_postgres = pytest.mark.needs_postgres


@pytest.fixture(scope="module")
def postgres():
    server = Postgres.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pgpass(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return postgres.pgpass(tmp_path_factory.mktemp("credentials") / "pgpass")


@pytest.fixture(scope="module")
def mlflow_server(postgres: Postgres, pgpass: Path, tmp_path_factory: pytest.TempPathFactory):
    server = MlflowServer(postgres.url("mlflow"), tmp_path_factory.mktemp("mlflow"), pgpass)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shared_study(sweep_env: dict, postgres: Postgres, pgpass: Path, mlflow_server: MlflowServer, monkeypatch) -> dict:
    """The tiny study of `sweep_env`, its storage on PostgreSQL (through $SCPL_OPTUNA_STORAGE, so the
    config names none), its runs on the MLflow server, the password only in the .pgpass file."""
    database = f"study{free_port()}"  # a fresh database per test: studies of earlier tests would be found
    storage = postgres.create_database(database)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("SCPL_OPTUNA_STORAGE", storage)
    overrides = [*sweep_env["overrides"], "sweep.storage=null", f"tracking.uri={mlflow_server.uri}", "tracking.experiment=" + database]
    return {**sweep_env, "overrides": overrides, "storage": storage, "mlflow": mlflow_server.uri, "experiment": database, "password": postgres.password}


def worker(env: dict, *extra: str, host: str | None = None) -> subprocess.Popen:
    """A sweep worker process; `host` pretends it runs on another node (only its heartbeat can tell it died)."""
    code = "import sys; from scpl_kit.sweep import main; sys.exit(main(sys.argv[1:]))"
    if host:
        code = f"import socket; socket.gethostname = lambda: {host!r}; " + code
    return subprocess.Popen([sys.executable, "-c", code, *env["overrides"], *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def runs_of(env: dict) -> list:
    client = MlflowClient(env["mlflow"])
    experiment = client.get_experiment_by_name(env["experiment"])
    return client.search_runs([experiment.experiment_id]) if experiment else []


def assert_no_password_anywhere(env: dict, texts: list[str]) -> None:
    """Not in what the workers printed, the MLflow runs, the study, or any file they wrote."""
    password = env["password"]
    for text in texts:
        assert password not in text
    for run in runs_of(env):
        assert password not in repr(run.data.params) + repr(run.data.tags)
    study = load_study(env)
    assert password not in repr(study.user_attrs) + repr([(t.user_attrs, t.system_attrs) for t in study.trials])
    for path in env["tmp"].rglob("*"):
        if path.is_file() and path.stat().st_size < 10**7 and "pgpass" not in path.name:
            assert password.encode() not in path.read_bytes(), path


@pytest.mark.slow
@needs_postgres
def test_slurm_sweep_workers_share_one_study_on_postgresql_and_a_killed_worker_leaves_no_trial_running(
    shared_study: dict, slurm, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A worker on 'another node' is killed inside a trial; two workers submitted to Slurm then finish
    the study together: exactly n_trials, no duplicate, no trial left RUNNING, every run on the MLflow server."""
    doomed = worker(shared_study, "sweep.worker=9", host="node-b")
    deadline = time.time() + 180
    while time.time() < deadline and doomed.poll() is None:
        time.sleep(0.5)
        try:
            running = [t for t in load_study(shared_study).trials if t.state == TrialState.RUNNING]
        except (KeyError, ValueError):  # the study is not created yet
            continue
        if running and any(r.info.status == "RUNNING" and r.data.tags.get("optuna_trial") == str(running[0].number) for r in runs_of(shared_study)):
            break
    doomed.send_signal(signal.SIGKILL)
    doomed_output = doomed.communicate()
    (killed,) = [t for t in load_study(shared_study).trials if t.state == TrialState.RUNNING]
    assert killed.user_attrs["worker_host"] == "node-b"

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    jobs = tmp_path / "jobs"
    launcher = ["launcher=slurm", "launcher.workers=2", "launcher.wait=true", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1",
                "launcher.mem_gb=null", f"launcher.folder={jobs}"]
    assert submit_main([*launcher, "sweep", *shared_study["overrides"]]) == 0
    printed = capsys.readouterr()
    logs = [path.read_text() for path in jobs.glob("*_log.*")]
    assert len(list(jobs.glob("*_0_result.pkl"))) == 2 and not any("database is locked" in log for log in logs)
    trials = load_study(shared_study).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[killed.number].state == TrialState.FAIL and "error" not in trials[killed.number].user_attrs
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(counted(trials)) == 4
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 4  # no point drawn twice
    assert len({t.user_attrs["worker_pid"] for t in finished if t.user_attrs["worker_host"] != "node-b"}) == 2  # both jobs took trials
    assert any(t.system_attrs.get("failed_trial") == killed.number for t in finished)  # the killed trial was retried

    runs = runs_of(shared_study)
    by_trial = {r.data.tags["optuna_trial"]: r for r in runs if "optuna_trial" in r.data.tags and r.data.tags["optuna_trial"] != str(killed.number)}
    assert {str(t.number) for t in finished} <= set(by_trial) and all(by_trial[str(t.number)].info.status == "FINISHED" for t in finished)
    assert [r.info.status for r in runs if r.data.tags.get("optuna_trial") == str(killed.number)] == ["KILLED"]
    assert [r.info.status for r in runs if r.data.tags.get("sweep") == "true"] == ["FINISHED"]  # the study's parent run
    assert_no_password_anywhere(shared_study, [*doomed_output, printed.out, printed.err, *logs])


def test_an_unreachable_database_fails_in_seconds_with_one_line(sweep_env: dict, processed_dir: Path, capsys, monkeypatch) -> None:
    closed = free_port()  # nothing listens there
    monkeypatch.setenv("SCPL_OPTUNA_STORAGE", f"postgresql+psycopg://scpl:hunter2@127.0.0.1:{closed}/optuna")
    started = time.time()
    assert sweep_main([*sweep_env["overrides"], "sweep.storage=null"]) == 2
    err = capsys.readouterr().err
    assert time.time() - started < 15
    assert err.count("\n") == 1 and f"Optuna storage postgresql+psycopg://scpl:***@127.0.0.1:{closed}/optuna cannot be used" in err
    assert "hunter2" not in err

    started = time.time()
    assert train_main(["profile=smoke", f"data.processed_dir={processed_dir}", f"tracking.uri=postgresql+psycopg://scpl@127.0.0.1:{closed}/mlflow", "trainer.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert time.time() - started < 15 and err.count("\n") == 1 and "MLflow store postgresql+psycopg://scpl@127.0.0.1" in err


def test_a_password_on_the_command_line_or_in_a_config_file_is_refused(sweep_env: dict, capsys) -> None:
    for main, args in ((sweep_main, [*sweep_env["overrides"], "sweep.storage=postgresql+psycopg://scpl:hunter2@db:5432/optuna"]),
                       (train_main, ["tracking.uri=http://me:hunter2@mlflow:5000"]),
                       (submit_main, ["train", "tracking.uri=http://me:hunter2@mlflow:5000"])):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "hunter2" not in err and "***" in err and "~/.pgpass" in err
    study = sweep_env["conf"] / "sweep" / "tiny.yaml"  # nor in a config file
    study.write_text(study.read_text().replace("storage: sqlite:///", "storage: postgresql+psycopg://scpl:hunter2@db/optuna?x=/"))
    assert sweep_main(sweep_env["overrides"]) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "sweep.storage=postgresql+psycopg://scpl:***@db" in err
    assert not (sweep_env["tmp"] / "optuna.db").exists()


def test_launcher_mistakes_fail_before_anything_is_queued(sweep_env: dict, capsys) -> None:
    cases = {
        ("launcher.partiton=gpu", "train"): "valid keys under 'launcher'",
        ("profile=smoke", "train"): "only launcher=... and launcher.* come before 'train'",
        ("launcher.tasks_per_node=2", "train", "engine=sequential"): "choose a multi-process engine (async_sgd, ddp, gpipe, hierarchical, pipeline)",
        ("launcher=slurm", "launcher.workers=2", "sweep", *sweep_env["overrides"]): "not an sqlite file",
        ("launcher=slurm",): "name what to submit",
        ("train", "launcher=slurm"): "launcher overrides go before 'train'",
    }
    for args, message in cases.items():
        assert submit_main(list(args)) == 2, args
        assert message in capsys.readouterr().err, args


def test_a_failed_job_is_reported_with_its_cause_and_the_end_of_its_log(tmp_path: Path, capsys) -> None:
    """What the job's command printed (here the kit's missing-data line) reaches the submitter's terminal,
    without submitit's own frames."""
    missing = tmp_path / "nowhere"
    args = ["launcher=local", "launcher.wait=true", f"launcher.folder={tmp_path / 'jobs'}", "train", "profile=smoke", f"data.processed_dir={missing}"]
    assert submit_main(args) == 1
    err = capsys.readouterr().err
    assert "training exited with status 2" in err and f"prepared data for 'mnist5k' not found at {missing}" in err
    assert "_log.err:" in err and "submitit" not in err.split("_log.err:")[1]


@pytest.mark.slow
def test_a_slurm_job_killed_mid_epoch_resumes_on_requeue_into_the_same_mlflow_run(slurm, processed_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Two ranks (ddp) in one Slurm job; Slurm preempts it (SIGTERM, then submitit's SIGUSR2) during
    epoch 2; submitit requeues it and the run continues from epoch 1's checkpoint in its MLflow run."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    mlflow = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoints = tmp_path / "checkpoints"
    overrides = [
        "profile=smoke", "method=bp", "engine=ddp", "trainer.epochs=4", "trainer.batch_size=64", f"data.processed_dir={processed_dir}",
        f"out_dir={tmp_path / 'out'}", f"trainer.checkpoint_dir={checkpoints}", f"tracking.uri={mlflow}", "trainer.progress=false",
    ]
    spec = compose_config(["launcher=slurm", "launcher.tasks_per_node=2", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1",
                           "launcher.mem_gb=null", f"launcher.folder={tmp_path / 'jobs'}"], config_name="submit").launcher
    (job,) = submit_training(spec, overrides).jobs
    deadline = time.time() + 300
    while not list(checkpoints.glob("*.pt")):  # epoch 1 is saved; epoch 2 is under way
        assert time.time() < deadline, job.paths.stderr.read_text() if job.paths.stderr.exists() else "no log"
        time.sleep(0.2)
    job._interrupt()  # what Slurm does to a preempted job: SIGTERM, then the warning signal
    while "JobState=PENDING" not in slurm.scontrol("show", "job", job.job_id):
        assert time.time() < deadline, slurm.scontrol("show", "job", job.job_id)
        time.sleep(0.2)
    slurm.scontrol("update", f"JobId={job.job_id}", "StartTime=now")  # skip Slurm's two-minute delay before a requeued job may start
    while not job.paths.result_pickle.exists():
        assert time.time() < deadline, job.paths.stderr.read_text()
        time.sleep(0.5)
    assert job.results()[0] == 0
    log = job.paths.stderr.read_text()
    assert "this job is preempted" in log and "Requeued job" in log
    assert "resuming from" in log and ("after epoch 1" in log or "after epoch 2" in log)
    assert "Restarts=1" in slurm.scontrol("show", "job", job.job_id)
    client = MlflowClient(mlflow)
    (run,) = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "completed"
    assert "Slurm requeues" in run.data.tags["stopped"]  # left by the preempted attempt, which ended the run KILLED
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3, 4]  # each epoch once


@pytest.mark.needs_slurm  # submitit's Slurm executor refuses to start without srun
def test_the_launcher_config_becomes_the_sbatch_script(tmp_path: Path) -> None:
    """Partition, GPUs, CPUs, memory, time and the warning signal of conf/launcher/slurm.yaml, as sbatch reads them."""
    spec = compose_config(["launcher=slurm", "launcher.partition=gpu", "launcher.nodes=2", "launcher.tasks_per_node=4", "launcher.gpus_per_node=4",
                           f"launcher.folder={tmp_path}", "launcher.setup=[module load cuda]"], config_name="submit").launcher
    script = make_executor(spec, "train-scpl")._executor._make_submission_file_text("python -m job", "uid")
    for line in ("--partition=gpu", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=32GB",
                 "--time=240", "--signal=USR2@120", "--job-name=train-scpl", "module load cuda"):
        assert line in script, line
    without_gpus = compose_config(["launcher=slurm", "launcher.gpus_per_node=0", f"launcher.folder={tmp_path}"], config_name="submit").launcher
    assert "gpus" not in make_executor(without_gpus, "x")._executor._make_submission_file_text("python -m job", "uid")
