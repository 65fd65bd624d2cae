"""Run many independent DVC stages at once on this machine: one worker process per core, each
running one stage at a time, every stage's output in its own log.

Why not one `subprocess` (or one submitit job) per stage: a fresh process spends about 7 s of a 17 s
offline run (`train profile=offline_text model=transformer method=bp`) importing torch, torch._dynamo
(the optimizer's first step imports it) and MLflow and opening its store; the same run in a warm
worker took 10.2 s, 9.7 of them its epochs (docs/pipeline.md). A worker pays that once and then runs `python -m scpl_kit.train ...` stages in-process: each run seeds
everything and sets torch's threads itself, so its weights and metrics are bitwise those of a fresh
process (tests/test_pipeline.py checks them against `dvc repro`). Any other command runs as a
subprocess of the worker. concurrent.futures keeps the queue; tqdm shows how many stages are done.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

from tqdm.auto import tqdm

TRAIN = ["python", "-m", "scpl_kit.train"]


@dataclass(frozen=True)
class Stage:
    """One DVC stage as DVC would run it: delete its outputs, then run its command(s) in `root`."""

    name: str
    commands: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Done:
    name: str
    ok: bool
    seconds: float
    log: Path
    last_line: str = ""


def cpu_count() -> int:
    """The cores this process may use (a container or `taskset` may give fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_stages(stages: Sequence[Stage], root: Path, workers: int, logs: Path) -> list[Done]:
    """Run every stage, at most `workers` at a time; returns each stage's outcome, in finishing order.
    After the first failure no new stage starts (the running ones finish, so nothing is half-written)."""
    logs.mkdir(parents=True, exist_ok=True)
    queue, running, done = list(stages), set(), []
    workers = max(1, min(workers, len(stages)))
    # spawn: a fresh interpreter per worker (forking a process that may hold threads is unsafe).
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=share_cores, initargs=(workers,)) as pool:
        with tqdm(total=len(stages), desc="stages", unit="stage", file=sys.stdout, dynamic_ncols=True) as bar:
            # Handed out one at a time as workers free up (the executor would queue ahead), so that
            # after a failure nothing new starts.
            while queue or running:
                while queue and len(running) < workers and all(d.ok for d in done):
                    stage = queue.pop(0)
                    running.add(pool.submit(run_stage, stage, str(root), str(logs / f"{safe_name(stage.name)}.log")))
                if not running:
                    break
                finished, running = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for future in finished:
                    outcome = future.result()
                    done.append(outcome)
                    bar.update()
                    status = "done" if outcome.ok else f"FAILED ({outcome.last_line}); log: {outcome.log}"
                    bar.write(f"[{len(done)}/{len(stages)}] {outcome.name} {status} in {outcome.seconds:.0f} s")
    return done


def share_cores(workers: int) -> None:
    """In a new worker, before torch loads: a run that leaves its thread count to torch (`trainer.threads:
    null`) gets this worker's share of the cores, not all of them; N workers of all-core OpenMP pools
    on N cores spin against each other (the smoke pipeline's training took 73 s instead of 16). Bitwise
    equality with a one-at-a-time `dvc repro` holds for runs that pin `trainer.threads`, as every offline
    and smoke profile does: a thread count changes the order of floating-point sums."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // workers)))


def safe_name(stage: str) -> str:
    return stage.replace("@", "-").replace("/", "_")


def run_stage(stage: Stage, root: str, log_path: str) -> Done:
    """In a worker: the stage's outputs removed, its commands run, stdout and stderr into its log."""
    start = time.perf_counter()
    os.chdir(root)
    for output in stage.outputs:
        path = Path(root) / output
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    with open(log_path, "w") as log, redirected(log):
        ok = all(run_command(command) == 0 for command in stage.commands)
    return Done(stage.name, ok, time.perf_counter() - start, Path(log_path), "" if ok else last_line(Path(log_path)))


def run_command(command: str) -> int:
    words = shlex.split(command)
    if words[:3] == TRAIN:
        from scpl_kit.train import main  # in the worker: imported once, kept for every later stage

        try:
            return main(words[3:])
        except BaseException as error:  # noqa: BLE001 - the pool must outlive one stage's crash
            import traceback

            traceback.print_exc()
            return 1 if not isinstance(error, KeyboardInterrupt) else 130
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return subprocess.run(command, shell=True).returncode


@contextlib.contextmanager
def redirected(log: IO[str]) -> Iterator[None]:
    """File descriptors 1 and 2 point at `log` for the duration: the stage's Python output, its logging
    handlers (bound to sys.stderr once, in the first stage) and its subprocesses (torchrun) all land there."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"
