"""The DVC pipeline end to end, in a temporary copy of the repository on the `smoke` profile."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from scpl_kit.environment import cpu_model

from conftest import REPO

pytestmark = pytest.mark.slow


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A git + DVC copy of the project's tracked and new files, set to the smoke profile."""
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in listed.stdout.splitlines():
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(profile="smoke", methods=["bp", "scpl"], seeds=[0], throughput={"width": 0.0625, "batch": 16, "steps": 3, "warmup": 1, "workers": 2})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.lock").unlink(missing_ok=True)
    # What users' shells have: no PYTHONDONTWRITEBYTECODE (so Python writes __pycache__/ into the
    # stage dependencies under src/), no MLflow or DVC settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_")) and k != "PYTHONDONTWRITEBYTECODE"}
    # The copy's own sources, not the editable install's, so DVC's dependency hashes mean something.
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONPATH=str(root / "src"), DVC_NO_ANALYTICS="1")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        sh(cmd, root, env)
    return root, env


def test_repro_builds_tables_and_plots(repo) -> None:
    root, env = repo
    ran = stages_run(sh(["dvc", "repro"], root, env))
    assert ran == {"prepare", "train@bp-0", "train@scpl-0", "evaluate@bp-0", "evaluate@scpl-0", "tables", "throughput"}
    table = pd.read_csv(root / "reports/tables/accuracy.csv")
    assert {"dataset", "model", "method", "n_runs", "acc_mean", "acc_std"} <= set(table.columns)
    assert sorted(table.method) == ["bp", "scpl"] and set(table.dataset) == {"mnist5k"} and set(table.n_runs) == {1}
    assert "| mnist5k" in (root / "reports/tables/accuracy.md").read_text()
    assert (root / "reports/figures/accuracy_curves.png").read_bytes()[:4] == b"\x89PNG"
    speed = pd.read_csv(root / "reports/tables/throughput.csv")
    wanted = {"method", "engine", "workers", "microbatches", "projector", "samples_per_s", "speedup_vs_bp1", "ideal_speedup", "peak_act_mem_mb"}
    assert wanted <= set(speed.columns) and set(speed.engine) == {"sequential", "threads", "pipeline", "gpipe"}
    assert (speed.samples_per_s > 0).all()
    per_process = speed.engine != "threads"  # the threads engine's workers share one process: no per-worker memory
    assert (speed.peak_act_mem_mb[per_process] > 0).all() and speed.peak_act_mem_mb[~per_process].isna().all()
    assert (root / "reports/figures/throughput.png").is_file()
    assert (root / "runs/scpl-s0/model.pt").is_file() and (root / "data/processed/mnist5k/meta.json").is_file()
    assert "train@scpl-0" in sh([sys.executable, "-c", (
        "import sqlite3,sys; db=sqlite3.connect(sys.argv[1]);"
        "print(db.execute(\"select group_concat(value) from tags where key='dvc_stage'\").fetchone()[0])"
    ), str(root / "mlflow.db")], root, env)
    # Each row names its MLflow runs, and the header says where the numbers were measured.
    run_ids = json.loads((root / "reports/metrics.json").read_text())["mnist5k/vgg/scpl"]["mlflow_run_ids"]
    assert run_ids == {"s0": json.loads((root / "runs/scpl-s0/metrics.json").read_text())["mlflow_run_id"]}
    header = (root / "reports/tables/accuracy.md").read_text()
    assert f"Trained on: {cpu_model()}" in header and "Profile: smoke" in header and "best validation accuracy" in header
    assert f"Measured on {cpu_model()}" in (root / "reports/tables/throughput.md").read_text()
    # Figures fit the page `dvc plots show` writes (it shows images at their own size and crops the rest).
    assert png_width(root / "reports/figures/throughput.png") <= 1000 and png_width(root / "reports/figures/accuracy_curves.png") <= 1000
    assert list((root / "src/scpl_kit").glob("__pycache__/*.pyc"))  # Python wrote bytecode beside the sources, as in a user's shell


def test_second_repro_does_nothing(repo) -> None:
    """Even though the first one wrote __pycache__/ into src/ (.dvcignore keeps it out of the hashes)."""
    root, env = repo
    assert "up to date" in sh(["dvc", "status"], root, env)
    assert stages_run(sh(["dvc", "repro"], root, env)) == set()


def test_plots_and_experiments_are_readable(repo) -> None:
    root, env = repo
    sh(["dvc", "plots", "show"], root, env)
    assert (root / "dvc_plots/index.html").is_file()
    sh(["git", "check-ignore", "-q", "dvc_plots/index.html"], root, env)  # not left as an untracked file
    # The README's `make exps`: metrics and parameters, not one column per dependency hash.
    table = sh(["make", "-s", "-o", ".venv/.installed", "exps"], root, {k: v for k, v in env.items() if not k.startswith("MAKE")})
    columns = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert "mnist5k/vgg/scpl.acc_mean" in columns and "profile" in columns
    assert len(columns) <= 20 and not re.search(r"[0-9a-f]{32}", table), table  # no dependency hashes, no run ids


def test_one_more_seed_runs_only_that_seed(repo) -> None:
    root, env = repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "seeds": [0, 1]}))
    ran = stages_run(sh(["dvc", "repro"], root, env))
    assert ran == {"train@bp-1", "train@scpl-1", "evaluate@bp-1", "evaluate@scpl-1", "tables"}
    assert set(pd.read_csv(root / "reports/tables/accuracy.csv").n_runs) == {2}


def test_dvc_exp_run_with_set_param(repo) -> None:
    root, env = repo
    sh(["git", "add", "-A"], root, env)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two seeds"], root, env)
    ran = stages_run(sh(["dvc", "exp", "run", "-S", "methods=[scpl]"], root, env))
    assert ran == {"tables"}  # the scpl runs exist already; only the table changes
    assert list(pd.read_csv(root / "reports/tables/accuracy.csv").method) == ["scpl"]
    assert "methods" in sh(["dvc", "exp", "show", "--md"], root, env)
