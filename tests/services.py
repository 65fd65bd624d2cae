"""Real servers for the cluster tests, each started in a temporary folder on 127.0.0.1 and stopped
after: PostgreSQL (Debian's `postgresql`), an MLflow tracking server on it, and a one-node Slurm
(Debian's `slurm-wlm` with `munge`). `scripts/test-services` installs the packages (as root; `make test`
and CI run it); a test that needs one declares it with a marker (COMPONENTS) and skips without it."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def as_postgres_user(command: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root; CI runs as root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@dataclass
class Postgres:
    """A throw-away cluster with a password-protected role `scpl` that owns the databases."""

    folder: Path
    port: int
    password: str

    user = "scpl"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"  # no password: libpq reads the .pgpass file

    def pgpass(self, path: Path) -> Path:
        path.write_text(f"127.0.0.1:{self.port}:*:{self.user}:{self.password}\n")
        path.chmod(0o600)  # libpq ignores a .pgpass that others can read
        return path

    @classmethod
    def start(cls) -> "Postgres":
        # Its own folder in /tmp: the server runs as the postgres user, who cannot enter pytest's (mode 700, root's) folders.
        folder = Path(tempfile.mkdtemp(prefix="scpl-postgres-"))
        binaries = postgres_bin()
        data, sockets = folder / "data", folder / "sockets"
        sockets.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres")
            shutil.chown(sockets, "postgres")
        server = cls(folder, free_port(), secrets.token_urlsafe(12))
        run(as_postgres_user([str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256"]))
        options = f"-c listen_addresses=127.0.0.1 -p {server.port} -k {sockets} -c fsync=off"
        run(as_postgres_user([str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start"]))
        server.sql(f"CREATE ROLE {cls.user} LOGIN PASSWORD '{server.password}'")
        server.create_database("mlflow")
        return server

    def sql(self, statement: str) -> None:
        """As the superuser, over the Unix socket (trusted locally; TCP asks for passwords)."""
        run(as_postgres_user(["psql", "-h", str(self.folder / "sockets"), "-p", str(self.port), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c", statement]))

    def create_database(self, name: str) -> str:
        self.sql(f"CREATE DATABASE {name} OWNER {self.user}")
        return self.url(name)

    def stop(self) -> None:
        run(as_postgres_user([str(postgres_bin() / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop"]))
        shutil.rmtree(self.folder, ignore_errors=True)


def run(command: list[str]) -> str:
    done = subprocess.run([which(command[0]) or command[0], *command[1:]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


class MlflowServer:
    """`mlflow server` with PostgreSQL as its backend store; the password comes from $PGPASSFILE."""

    def __init__(self, backend: str, folder: Path, pgpass: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = folder / "mlflow-server.log"
        env = {**os.environ, "PGPASSFILE": str(pgpass), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        command = [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination", str(folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server ended:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer in 120 s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            child.kill()
        self.process.kill()
        self.process.wait()


SLURM_CONF = """\
ClusterName=scpltest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge/socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
SchedulerParameters=sched_interval=2,bf_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class Slurm:
    """A one-node Slurm: munged with its own key and socket, slurmctld and slurmd as root, no
    accounting database (so submitit's `sacct` state queries warn; results come from its files)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            self._start()
        except BaseException:
            self.stop()  # whatever did start goes too: a failed start leaves no daemon behind
            raise

    def _start(self) -> None:
        folder = self.folder
        for name in ("munge", "state", "spool"):
            (folder / name).mkdir(parents=True)
        key = folder / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        (folder / "munge").chmod(0o755)
        munge = folder / "munge"
        run(["munged", "--force", f"--key-file={key}", f"--socket={munge / 'socket'}", f"--pid-file={munge / 'pid'}",
             f"--log-file={munge / 'log'}", f"--seed-file={munge / 'seed'}"])
        self.conf = folder / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(
            host=socket.gethostname(), folder=folder, ctld_port=free_port(), d_port=free_port(),
            cpus=os.cpu_count(), memory_mb=psutil.virtual_memory().total // 2**20 // 2,
        ))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        run(["slurmctld", "-f", str(self.conf)])
        run(["slurmd", "-f", str(self.conf)])
        deadline = time.time() + 60
        while "idle" not in self.sinfo():
            if time.time() > deadline:
                raise RuntimeError(f"the Slurm node did not come up: {self.sinfo()}\n{(folder / 'slurmctld.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def sinfo(self) -> str:
        return subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True).stdout

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True).stdout

    def stop(self) -> None:
        """Cancel every job, stop the daemons, and kill any job step still running: slurmstepd is
        detached from slurmd, so a test that failed mid-job would otherwise leave its steps behind."""
        env = {**os.environ, "SLURM_CONF": str(self.folder / "slurm.conf")}
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/pid"):
            path = self.folder / pid_file
            if path.is_file():
                try:
                    os.kill(int(path.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
        for step in self.steps():
            try:
                for process in [*step.children(recursive=True), step]:
                    process.kill()
            except psutil.NoSuchProcess:
                pass

    def steps(self) -> list[psutil.Process]:
        """The job steps (slurmstepd) this cluster's slurmd started, still running: a step works in its
        cluster's folder, so two test sessions' clusters (pytest-xdist workers) can run side by side."""
        mine = []
        for process in psutil.process_iter(["name"]):
            try:
                if process.info["name"] == "slurmstepd" and Path(process.cwd()).is_relative_to(self.folder):
                    mine.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return mine


# Debian installs the daemons (munged, slurmctld, slurmd) and runuser in /usr/sbin, which a non-root
# user's PATH (and a minimal one) lacks: they are installed all the same.
SYSTEM_PATHS = ("/usr/sbin", "/sbin")


def which(program: str) -> str | None:
    return shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), *SYSTEM_PATHS]))


def have(*programs: str) -> bool:
    return all(which(p) for p in programs)


def have_playwright() -> bool:
    import importlib.util

    return importlib.util.find_spec("playwright") is not None


# marker → (is it here?, what to install). A test marked `needs_<name>` skips without it, except
# under CI ($CI set), where it runs and fails: CI must not pass by skipping what it was meant to test.
COMPONENTS = {
    "needs_slurm": (lambda: have("slurmctld", "slurmd", "munged", "sbatch", "srun"), "apt-get install slurm-wlm munge"),
    "needs_postgres": (lambda: postgres_bin() is not None and have("runuser", "psql"), "apt-get install postgresql"),
    "needs_browser": (lambda: Path("/usr/bin/chromium").exists() and have_playwright(), "apt-get install chromium; pip install -e '.[dev]'"),
}
