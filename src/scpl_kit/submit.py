"""Training runs, sweep workers and the DVC training matrix as jobs: on Slurm, or as processes on
this machine, through submitit (Hydra's launcher plugins need `@hydra.main`, which the kit does not use).

    python -m scpl_kit.submit launcher=slurm launcher.nodes=2 launcher.tasks_per_node=4 train method=scpl engine=ddp
    python -m scpl_kit.submit launcher=slurm launcher.workers=8 sweep sweep=scpl_tau_lr
    python -m scpl_kit.submit launcher=slurm repro

Resources come from conf/launcher/ (`local` is the default). Each task of a training job is one
rank: submitit's torch-distributed environment gives it RANK, WORLD_SIZE, LOCAL_RANK and the first
node as the rendezvous, so the multi-process engines run across nodes as under torchrun. Every job
follows submitit's checkpointing protocol: preempted or out of time, it is requeued with the same
command, and training resumes from its last epoch's checkpoint into the same MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import submitit
from omegaconf import DictConfig

from scpl_kit.config import ConfigError, compose_config, project_root
from scpl_kit.databases import refuse_passwords
from scpl_kit.preflight import OneLineParser, PreflightError, Rule, check_output_dir, check_values, fail
from scpl_kit.stage_pool import Stage, cpu_count, run_stages

log = logging.getLogger("scpl_kit.submit")
COMMANDS = ("train", "sweep", "repro")


class JobFailed(RuntimeError):
    """A job's command ended with an error; raised inside the job so Slurm records it as failed
    (and jobs that depend on it with afterok do not start)."""


def _check(code: int, what: str) -> int:
    if code != 0:
        raise JobFailed(f"{what} exited with status {code}; its error is in this job's log")
    return code


class TrainingJob(submitit.helpers.Checkpointable):
    """`python -m scpl_kit.train <overrides>` as one task of a job; with several tasks, as one rank."""

    def __call__(self, overrides: list[str]) -> int:
        if submitit.JobEnvironment().num_tasks > 1:
            # Our engines map ranks to cuda:<local rank> themselves, so every task keeps every GPU visible.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        from scpl_kit.train import main  # in the job: torch loads there, not where jobs are submitted

        return _check(main(overrides), "training")


class SweepWorker(submitit.helpers.Checkpointable):
    """One worker of a shared study (`sweep.worker=<index>`: its own sampler seed)."""

    def __call__(self, overrides: list[str], worker: int) -> int:
        from scpl_kit.sweep import main

        return _check(main([*overrides, f"sweep.worker={worker}"]), f"sweep worker {worker}")


class ShellJob(submitit.helpers.Checkpointable):
    """A command in the repository: one DVC stage's own command, or `dvc ...`."""

    def __call__(self, root: str, command: str) -> int:
        return _check(subprocess.run(command, shell=True, cwd=root).returncode, command)


@dataclass
class Submitted:
    what: str
    jobs: list[Any]


def make_executor(spec: DictConfig, name: str, after: Sequence[Any] = ()) -> submitit.Executor:
    """An executor for `spec.cluster` (local or slurm) with the launcher's resources. `after`: jobs
    that must succeed first, as a Slurm dependency (the local executor has none: its callers wait)."""
    executor = submitit.AutoExecutor(folder=Path(spec.folder).resolve(), cluster=spec.cluster, slurm_max_num_timeout=spec.get("max_num_timeout", 3))
    resources = {
        "name": name, "timeout_min": spec.timeout_min, "nodes": spec.nodes, "tasks_per_node": spec.tasks_per_node,
        "gpus_per_node": gpus_per_node(spec), "cpus_per_task": spec.cpus_per_task, "mem_gb": spec.mem_gb,
    }
    slurm = {
        "partition": spec.get("partition"), "account": spec.get("account"), "qos": spec.get("qos"), "constraint": spec.get("constraint"),
        "signal_delay_s": spec.get("signal_delay_s"), "array_parallelism": spec.array_parallelism, "setup": list(spec.get("setup") or []),
        # A job whose dependency failed would otherwise wait in the queue forever.
        "additional_parameters": {**dict(spec.get("additional") or {}), **({"kill-on-invalid-dep": "yes"} if after else {})},
        "dependency": "afterok:" + ":".join(dict.fromkeys(str(job.job_id).split("_")[0] for job in after)) if after else None,
    }
    executor.update_parameters(
        **{key: value for key, value in resources.items() if value is not None},
        **{f"slurm_{key}": value for key, value in slurm.items() if value is not None},
    )
    return executor


def gpus_per_node(spec: DictConfig) -> int | None:
    """null: every GPU of this machine (the local executor hides the others from the job);
    0: none, and no GPU option in the Slurm script (clusters without GPUs may refuse one)."""
    if spec.gpus_per_node is None:
        import torch

        return torch.cuda.device_count() or None
    return spec.gpus_per_node or None


def wait_for(jobs: Sequence[Any]) -> None:
    for job in jobs:
        try:
            job.results()
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
            raise JobFailed(failure_of(job, error)) from None


LOG_TAIL = 20  # lines: a Python traceback, or the lines logged before an error
SUBMITIT_TRACE = "Submitted job triggered an exception"  # submitit's line before the traceback it adds to the log


def failure_of(job: Any, error: Exception) -> str:
    """Why `job` failed: the cause in one line, then the end of what the job's command wrote to its error
    log (a one-line `error: ...` of the kit, or a traceback). submitit's own message ends with the log's
    path, keeps the cause in the middle of a traceback, and its log ends with submitit's frames."""
    parts = str(error).split("\n" + "-" * 22 + "\n")  # FailedJobError: header, the job's traceback, footer
    lines = (parts[1] if len(parts) == 3 else str(error)).strip().splitlines()
    cause = lines[-1] if len(parts) == 3 else " ".join(lines[:2])
    log = (job.stderr() or "").split(SUBMITIT_TRACE)[0].rstrip().splitlines()
    log = log[:-1] if log and log[-1].startswith("submitit ERROR") else log  # the first half of submitit's marker line
    log = log[-LOG_TAIL:]
    tail = "".join(f"\n    {line}" for line in log)
    return f"job {job.job_id}: {cause}" + (f"\n  the end of {job.paths.stderr}:{tail}" if log else "")


def submit_training(spec: DictConfig, overrides: list[str]) -> Submitted:
    from scpl_kit.engines import ENGINES  # imported here: torch takes seconds, and other commands do not need it

    cfg = compose_config(overrides)  # a bad override fails here, in seconds, not in the queue
    ranks = spec.nodes * spec.tasks_per_node
    if ranks > 1 and not ENGINES.get(cfg.engine.name).multiprocess:
        several = [name for name in ENGINES.names() if ENGINES.get(name).multiprocess]
        raise ConfigError(
            f"launcher.nodes × launcher.tasks_per_node = {ranks} processes, but engine={cfg.engine.name} runs in one; "
            f"choose a multi-process engine ({', '.join(several)}) or one task"
        )
    job = make_executor(spec, f"train-{cfg.method.name}").submit(TrainingJob(), overrides)
    return Submitted(f"training {shlex.join(overrides)} on {spec.nodes} node(s) × {spec.tasks_per_node} task(s)", [job])


def submit_sweep(spec: DictConfig, overrides: list[str]) -> Submitted:
    from scpl_kit.sweep import load_sweep

    if any(o.startswith("sweep.worker=") for o in overrides):
        raise ConfigError("sweep.worker is set per job by the launcher; leave it out")
    sweep = load_sweep(overrides)  # composes, and checks that the study's database answers
    if spec.cluster != "local" and spec.workers > 1 and sweep.storage_url.startswith("sqlite"):
        raise PreflightError(
            f"{spec.workers} workers on {spec.cluster} share one study through a database server, not an sqlite file "
            "(one writer at a time, and unsafe on network file systems): set SCPL_OPTUNA_STORAGE or sweep.storage to "
            "postgresql+psycopg://<user>@<host>:5432/<database>, with the password in $PGPASSWORD or ~/.pgpass"
        )
    jobs = make_executor(spec, f"sweep-{sweep.spec.study_name}").map_array(SweepWorker(), [overrides] * spec.workers, range(spec.workers))
    return Submitted(f"{spec.workers} worker(s) of study {sweep.study_name}", list(jobs))


@dataclass
class ReproPlan:
    """What `dvc repro` has to run, split for parallel runs: the stale stages upstream of the training
    matrix, the matrix's stale items (independent runs: one array task or pool slot each), then the rest."""

    upstream: list[str]
    matrix: list[Stage]


def plan_repro(root: Path, matrix_stages: Sequence[str]) -> ReproPlan:
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges run from a stage to the stages it depends on
        changed = set(repo.status())
        matrix = [s for s in repo.index.stages if s.name.split("@")[0] in matrix_stages and s.cmd]
        stale_upstream = {u for s in matrix for u in nx.descendants(graph, s) if u.addressing in changed} - set(matrix)
        # An item is stale if it changed, or if a stage it depends on runs first.
        stale = [s for s in matrix if s.addressing in changed or stale_upstream & nx.descendants(graph, s)]
        return ReproPlan(sorted(u.addressing for u in stale_upstream), [as_stage(s) for s in stale])


def as_stage(stage: Any) -> Stage:
    """A DVC stage as DVC runs it: its outputs deleted first (so no file of an older run survives), then its command(s)."""
    commands = [stage.cmd] if isinstance(stage.cmd, str) else list(stage.cmd)
    return Stage(stage.addressing, tuple(commands), tuple(str(out.def_path) for out in stage.outs if not out.persist))


def stage_command(stage: Stage) -> str:
    """The stage as one shell command, for a job on the cluster."""
    return " && ".join([*(f"rm -rf {shlex.quote(out)}" for out in stage.outputs), *stage.commands])


def run_dvc(root: str, *arguments: str) -> None:
    print(f"$ {shlex.join(['dvc', *arguments])}", flush=True)
    _check(subprocess.run(["dvc", *arguments], cwd=root).returncode, f"dvc {arguments[0]}")


def repro_here(spec: DictConfig, plan: ReproPlan, root: str) -> Submitted:
    """The local launcher: upstream stages through `dvc repro`, the matrix on a pool of one worker per
    core (`launcher.array_parallelism`, null: every core), `dvc commit` of what finished (dvc.lock is
    written once, not by every run at once), then `dvc repro` for the rest. Runs that failed stay stale:
    run it again and only they (and what depends on them) run."""
    if plan.upstream:
        run_dvc(root, "repro", *plan.upstream)
    workers = spec.array_parallelism or cpu_count()
    if plan.matrix:
        from scpl_kit.tracking import open_store_once

        tracking = compose_config([]).tracking  # the stages' own: the grid sets no tracking.uri or experiment
        if tracking.enabled:
            open_store_once(tracking.uri, tracking.experiment)
    print(f"{len(plan.matrix)} training stage(s) on {min(workers, max(len(plan.matrix), 1))} worker(s); logs in {Path(spec.folder).resolve()}", flush=True)
    finished = run_stages(plan.matrix, Path(root), workers, Path(spec.folder).resolve()) if plan.matrix else []
    succeeded = [d.name for d in finished if d.ok]
    if succeeded:
        run_dvc(root, "commit", "--force", *succeeded)
    failed = [d.name for d in finished if not d.ok]
    if failed:  # the pool starts nothing after a failure: the stages it did not start stay stale too
        raise JobFailed(f"{len(failed)} stage(s) failed ({', '.join(failed)}; see their logs); {len(succeeded)} finished and were committed")
    run_dvc(root, "repro")
    return Submitted(f"dvc repro: {len(plan.upstream)} upstream stage(s), {len(plan.matrix)} training stage(s) on {workers} worker(s), then the rest", [])


def submit_repro(spec: DictConfig, arguments: list[str]) -> Submitted:
    """On a cluster: upstream stages (one job) → the matrix's stale items (an array job, one task per
    stage, each running the stage's own command) → one job that records them in dvc.lock (`dvc commit`:
    outputs made outside `dvc repro`) and runs the rest of the pipeline. Not `dvc repro <stage>` in
    every task: each would rewrite dvc.lock as it ends, many at once; here one job writes it.
    On this machine (launcher=local): the same plan, with the matrix on a pool of workers (repro_here)."""
    if arguments:
        raise ConfigError(f"repro takes no arguments (got {' '.join(arguments)}); set parameters in params.yaml")
    root = str(project_root())
    plan = plan_repro(Path(root), list(spec.array_stages))
    if spec.cluster == "local":
        return repro_here(spec, plan, root)
    upstream = [make_executor(spec, "repro-upstream").submit(ShellJob(), root, shlex.join(["dvc", "repro", *plan.upstream]))] if plan.upstream else []
    commands = [stage_command(stage) for stage in plan.matrix]
    array = list(make_executor(spec, "repro-matrix", after=upstream).map_array(ShellJob(), [root] * len(commands), commands)) if commands else []
    finish = [*(["dvc commit --force " + " ".join(shlex.quote(stage.name) for stage in plan.matrix)] if plan.matrix else []), "dvc repro"]
    rest = make_executor(spec, "repro-rest", after=array or upstream).submit(ShellJob(), root, " && ".join(finish))
    return Submitted(
        f"dvc repro: {len(plan.upstream)} upstream stage(s), {len(plan.matrix)} training stage(s) as an array, then the rest",
        [*upstream, *array, rest],
    )


SUBMITTERS = {"train": submit_training, "sweep": submit_sweep, "repro": submit_repro}


def split_arguments(argv: Sequence[str]) -> tuple[list[str], str, list[str]]:
    """`launcher...` overrides, the command, and the command's own arguments."""
    position = next((i for i, arg in enumerate(argv) if arg in COMMANDS), None)
    if position is None:
        raise ConfigError(f"name what to submit: one of {', '.join(COMMANDS)} (after any launcher=... overrides)")
    launcher = list(argv[:position])
    stray = [arg for arg in launcher if not arg.startswith(("launcher=", "launcher."))]
    if stray:
        raise ConfigError(f"{' '.join(stray)}: only launcher=... and launcher.* come before {argv[position]!r}; training overrides go after it")
    misplaced = [arg for arg in argv[position + 1 :] if arg.startswith(("launcher=", "launcher."))]
    if misplaced:
        raise ConfigError(f"{' '.join(misplaced)}: launcher overrides go before {argv[position]!r}")
    return launcher, argv[position], list(argv[position + 1 :])


def report(submitted: Submitted, spec: DictConfig) -> None:
    if not submitted.jobs:  # run here and already finished (repro on the local launcher)
        return
    ids = list(dict.fromkeys(str(job.job_id).split("_")[0] for job in submitted.jobs))  # an array's tasks are <id>_<index>
    print(f"submitted {submitted.what}: job(s) {', '.join(ids)} ({spec.cluster}); logs in {Path(spec.folder).resolve()}/<job id>_<task>_log.out")
    if spec.cluster == "slurm":
        print(f"follow: squeue --jobs {','.join(ids)}; cancel: scancel {' '.join(ids)}")


# conf/launcher/*.yaml's numbers, checked as preflight.RULES checks a run's; and the programs each cluster's jobs go through.
LAUNCHER_RULES = {
    "launcher.nodes": Rule(int, low=1),
    "launcher.tasks_per_node": Rule(int, low=1),
    "launcher.gpus_per_node": Rule(int, low=0, nullable=True),
    "launcher.cpus_per_task": Rule(int, low=1, nullable=True),
    "launcher.mem_gb": Rule(float, positive=True, nullable=True),
    "launcher.timeout_min": Rule(int, low=1),
    "launcher.workers": Rule(int, low=1),
    "launcher.array_parallelism": Rule(int, low=1, nullable=True),
    "launcher.max_num_timeout": Rule(int, low=0),
    "launcher.signal_delay_s": Rule(int, low=0, nullable=True),
}
CLUSTER_PROGRAMS = {"local": (), "slurm": ("sbatch", "srun")}


def check_launcher(cfg: DictConfig, command: str, arguments: list[str]) -> None:
    """What can be known before a job is queued: the launcher's values, a folder for its logs, the
    programs the command runs, and (train) the training config's values, which would otherwise fail
    in the job. The cluster's own programs are checked when submitit first needs them (missing_programs)."""
    check_values(cfg, LAUNCHER_RULES)
    spec = cfg.launcher
    if spec.cluster not in CLUSTER_PROGRAMS:
        raise ConfigError(f"launcher.cluster={spec.cluster!r}; valid clusters: {', '.join(CLUSTER_PROGRAMS)}")
    if spec.cluster == "local" and spec.nodes != 1:
        raise PreflightError(f"launcher.nodes={spec.nodes}: the local launcher runs jobs on this machine only (1 node); use launcher=slurm")
    if not isinstance(spec.wait, bool):
        raise PreflightError(f"launcher.wait={spec.wait!r}: expected true or false")
    check_output_dir(spec.folder, "launcher.folder")
    if command == "repro" and shutil.which("dvc") is None:
        raise PreflightError("repro runs `dvc`, which is not on PATH: activate the virtualenv the kit is installed in (source .venv/bin/activate)")
    if command == "train":
        check_values(compose_config(arguments))


def missing_programs(spec: DictConfig) -> list[str]:
    """The programs the launcher's cluster needs that this machine's PATH lacks (Slurm: sbatch to queue, srun to start tasks)."""
    return [program for program in CLUSTER_PROGRAMS.get(spec.cluster, ()) if shutil.which(program) is None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m scpl_kit.submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arguments", nargs="+", help="[launcher=<name>] [launcher.<key>=<value> ...] {train|sweep|repro} [overrides ...]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        launcher, command, rest = split_arguments(args.arguments)
        refuse_passwords(rest)
        cfg = compose_config(launcher, config_name="submit")
        spec = cfg.launcher
        check_launcher(cfg, command, rest)
        try:
            submitted = SUBMITTERS[command](spec, rest)
        except (RuntimeError, OSError):
            # After the command's own checks, so its mistakes are named first: submitit raises when it
            # finds no srun ("are you indeed on a slurm cluster?"), and running sbatch fails when it is not there.
            missing = missing_programs(spec)
            if not missing:
                raise
            raise PreflightError(
                f"launcher={spec.cluster} needs {' and '.join(missing)}, which this machine does not have on PATH: "
                "submit from the cluster's login node, or use launcher=local to run the jobs here"
            ) from None
        report(submitted, spec)
        if spec.wait:
            wait_for(submitted.jobs)
            print(f"done: {submitted.what}")
    except (ConfigError, PreflightError) as error:
        return fail(error)
    except JobFailed as error:
        print(f"error: a job failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
