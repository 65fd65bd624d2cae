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


# A row of each engine, and each model's baseline and SCPL pipeline (bench/throughput.py has 17).
THROUGHPUT_ROWS = ["vgg_bp1", "vgg_1f1b", "vgg_scpl_threads", "vgg_scpl_pipeline", "transformer_bp1", "transformer_gpipe", "transformer_scpl_pipeline"]


def png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


# Session, not module: pytest-xdist keeps this module's tests on one worker (conftest.ONE_WORKER) but may
# run other modules' tests between them, and pytest tears a module fixture down at every such switch; the
# repro (about 4 min on 2 cores) then ran twice. The tests still run in their order, on one repository.
@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A git + DVC copy of the project's tracked and new files, set to the smoke profile."""
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in listed.stdout.splitlines():
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(
        grid={
            "vision": {"profile": "smoke", "datasets": ["mnist5k"], "models": ["vgg"], "methods": ["bp", "early_exit"], "seeds": [0]},
            "text": {"profile": "smoke_text", "datasets": ["bbcnews"], "models": ["transformer"], "methods": ["bp", "early_exit"], "seeds": [0]},
            "local_k": {"profile": "smoke", "dataset": "mnist5k", "model": "vgg", "ks": [2], "seeds": [0], "methods": ["cascade"]},
        },
        throughput={"rounds": 1, "workers": 2, "rows": THROUGHPUT_ROWS, "set": ["trainer.batch_size=16", "trainer.steps_per_epoch=8"]},
    )
    params["scaling"].update(epochs=1, rounds=1, target=0.5, configs=["bp1", "ddp"])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))  # the grid's parts in their order
    (root / "dvc.lock").unlink(missing_ok=True)
    # What users' shells have: no PYTHONDONTWRITEBYTECODE (so Python writes __pycache__/ into the
    # stage dependencies under src/), no MLflow or DVC settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_")) and k != "PYTHONDONTWRITEBYTECODE"}
    # The copy's own sources, not the editable install's, so DVC's dependency hashes mean something.
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONPATH=str(root / "src"), DVC_NO_ANALYTICS="1")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        sh(cmd, root, env)
    # What `make repro` runs: the training stages two at a time on a pool, then `dvc repro` for the rest.
    # Here, so that every test of this module finds a reproduced pipeline, whichever of them runs.
    printed = sh(["python", "-m", "scpl_kit.submit", "launcher.array_parallelism=2", "repro"], root, env)
    return root, env, printed


def pool_stages(output: str) -> set[str]:
    return set(re.findall(r"^\[\d+/\d+\] (\S+) done in", output, flags=re.MULTILINE))


def test_repro_builds_tables_and_plots(repo) -> None:
    root, env, printed = repo
    ran = stages_run(printed) | pool_stages(printed)
    assert re.search(r"^\[9/9\] ", printed, flags=re.MULTILINE)  # progress: stages done of stages to run
    assert ran == {
        "prepare@mnist5k", "train@mnist5k-vgg-bp-0", "train@mnist5k-vgg-early_exit-0",
        "prepare_text@bbcnews", "train_text@bbcnews-transformer-bp-0", "train_text@bbcnews-transformer-early_exit-0",
        "evaluate", "tables", "prepare_synthetic@synthetic_cifar10", "prepare_synthetic@synthetic_agnews", "throughput", "train_local@cascade-2-0", "train_local_e2e@0", "local_k", "scaling",
        "train_memory_check@bp-k1", "train_memory_check@infopro-k2", "train_memory_check@infopro-k4",
    }
    table = pd.read_csv(root / "reports/tables/accuracy.csv")
    assert {"dataset", "model", "method", "engine", "n_runs", "acc_mean", "acc_std"} <= set(table.columns)
    assert list(zip(table.dataset, table.model, table.method)) == [
        ("mnist5k", "vgg", "bp"), ("mnist5k", "vgg", "early_exit"), ("bbcnews", "transformer", "bp"), ("bbcnews", "transformer", "early_exit"),
    ]
    assert set(table.n_runs) == {1}
    assert "| mnist5k" in (root / "reports/tables/accuracy.md").read_text() and "| bbcnews" in (root / "reports/tables/accuracy.md").read_text()
    assert (root / "reports/figures/accuracy_curves.png").read_bytes()[:4] == b"\x89PNG"
    # Early Exit's four exits and its final answer, per block; BP has no exits, so no row.
    exits = pd.read_csv(root / "reports/tables/per_exit.csv")
    assert list(exits.config) == ["early_exit"] * 2 and {"block1", "block4", "final"} <= set(exits.columns)
    assert (exits[["block1", "block2", "block3", "block4", "final"]] > 0).all(axis=None)
    assert (root / "reports/figures/per_exit.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("mnist5k-vgg-bp", "mnist5k-vgg-early_exit", "bbcnews-transformer-bp", "bbcnews-transformer-early_exit"):
        assert json.loads((root / f"reports/eval/{name}-s0.json").read_text())["matches_training"]
    speed = pd.read_csv(root / "reports/tables/throughput.csv")
    wanted = {"row", "method", "engine", "schedule", "workers", "samples_per_s", "speedup_vs_bp1", "vs_best_bp", "ideal_speedup", "bubble_idle", "peak_mem_mb"}
    assert wanted <= set(speed.columns) and list(speed.row) == THROUGHPUT_ROWS and (speed.samples_per_s > 0).all()
    text = speed.set_index("row").loc[["transformer_bp1", "transformer_gpipe", "transformer_scpl_pipeline"]]
    assert text.speedup_vs_bp1.iloc[0] == 1.0 and text.ideal_speedup.iloc[-1] > 1 and text.bubble_idle.iloc[1] == pytest.approx(0.2)
    per_process = speed.engine != "threads"  # the threads engine's workers share one process: no per-worker memory
    assert (speed.peak_mem_mb[per_process] > 0).all() and speed.peak_mem_mb[~per_process].isna().all()
    assert (root / "reports/figures/throughput.png").is_file()
    local = pd.read_csv(root / "reports/tables/local_k.csv")  # BP at K = 1, then cascade at K = 2
    assert list(zip(local.method, local.k)) == [("bp", 1), ("cascade", 2)] and local.mem_vs_bp.iloc[0] == 1.0
    assert (local.error_mean < 100).all() and local.mem_vs_bp.iloc[1] < 1  # one module of two needs less than the network
    assert (root / "reports/figures/local_k.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "runs/mnist5k-vgg-early_exit-s0/model.pt").is_file() and (root / "data/processed/mnist5k/meta.json").is_file()
    assert "train@mnist5k-vgg-early_exit-0" in sh([sys.executable, "-c", (
        "import sqlite3,sys; db=sqlite3.connect(sys.argv[1]);"
        "print(db.execute(\"select group_concat(value) from tags where key='dvc_stage'\").fetchone()[0])"
    ), str(root / "mlflow.db")], root, env)
    # Each row names its MLflow runs, and the header says where the numbers were measured.
    run_ids = json.loads((root / "reports/metrics.json").read_text())["mnist5k/vgg/early_exit"]["mlflow_run_ids"]
    assert run_ids == {"s0": json.loads((root / "runs/mnist5k-vgg-early_exit-s0/metrics.json").read_text())["mlflow_run_id"]}
    header = (root / "reports/tables/accuracy.md").read_text()
    assert f"Trained on: {cpu_model()}" in header and "Profile: smoke" in header and "best validation accuracy" in header
    assert f"Measured on {cpu_model()}" in (root / "reports/tables/throughput.md").read_text()
    # Figures fit the page `dvc plots show` writes (it shows images at their own size and crops the rest).
    assert all(png_width(root / f"reports/figures/{name}.png") <= 1000 for name in ("throughput", "accuracy_curves", "per_exit", "local_k", "scaling"))
    assert list((root / "src/scpl_kit").glob("__pycache__/*.pyc"))  # Python wrote bytecode beside the sources, as in a user's shell


def test_second_repro_does_nothing(repo) -> None:
    """Even though the first one wrote __pycache__/ into src/ (.dvcignore keeps it out of the hashes)."""
    root, env, _ = repo
    assert "up to date" in sh(["dvc", "status"], root, env)
    assert stages_run(sh(["dvc", "repro"], root, env)) == set()


def test_results_move_through_the_dvc_remote(repo) -> None:
    """`dvc push` where the pipeline ran (a cluster), then `git clone` and `dvc pull` elsewhere (a laptop):
    the committed default remote, a folder beside the clone, works without setup; `dvc repro` there
    has nothing to do, and the tables are the ones that were pushed."""
    root, env, _ = repo
    sh(["git", "add", "-A"], root, env)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"], root, env)
    sh(["dvc", "push"], root, env)
    assert (root.parent / "scpl-kit-dvc-storage" / "files").is_dir()
    laptop = root.parent / "laptop"
    sh(["git", "clone", "-q", str(root), str(laptop)], root.parent, env)
    laptop_env = {**env, "PYTHONPATH": str(laptop / "src")}
    assert not (laptop / "runs/mnist5k-vgg-bp-s0").exists()  # only DVC holds the results
    sh(["dvc", "pull"], laptop, laptop_env)
    assert "up to date" in sh(["dvc", "status"], laptop, laptop_env)
    assert stages_run(sh(["dvc", "repro"], laptop, laptop_env)) == set()
    tables = sorted(p.relative_to(root) for p in (root / "reports").rglob("*") if p.is_file())
    assert tables and all((laptop / t).read_bytes() == (root / t).read_bytes() for t in tables)
    assert (laptop / "runs/mnist5k-vgg-bp-s0/model.pt").read_bytes() == (root / "runs/mnist5k-vgg-bp-s0/model.pt").read_bytes()


def test_plots_and_experiments_are_readable(repo) -> None:
    root, env, _ = repo
    sh(["dvc", "plots", "show"], root, env)
    assert (root / "dvc_plots/index.html").is_file()
    sh(["git", "check-ignore", "-q", "dvc_plots/index.html"], root, env)  # not left as an untracked file
    # The README's `make exps`: metrics and parameters, not one column per dependency hash.
    table = sh(["make", "-s", "-o", ".venv/.installed", "exps"], root, {k: v for k, v in env.items() if not k.startswith("MAKE")})
    columns = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert "mnist5k/vgg/early_exit.acc_mean" in columns and "grid.vision.profile" in columns
    # One accuracy column per table row (the committed 16-row table's too) and the parameters (the
    # scaling stage's 13 among them): about 52; the dependency hashes would add about 70 more.
    assert len(columns) <= 60 and not re.search(r"[0-9a-f]{32}", table), table  # no dependency hashes, no run ids


def add_seed(root: Path, parts: tuple[str, ...]) -> tuple[dict, int]:
    """One seed more in the grid's `parts` of the copy's params.yaml (whatever earlier tests left there)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    seed = max(max(params["grid"][part]["seeds"]) for part in parts) + 1
    for part in parts:
        params["grid"][part]["seeds"] = [*params["grid"][part]["seeds"], seed]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params["grid"], seed


def test_one_more_seed_runs_only_that_seed(repo) -> None:
    root, env, _ = repo
    grid, seed = add_seed(root, ("vision", "text"))
    ran = stages_run(sh(["dvc", "repro"], root, env))
    assert ran == {
        *(f"train@mnist5k-vgg-{method}-{seed}" for method in grid["vision"]["methods"]),
        *(f"train_text@bbcnews-transformer-{method}-{seed}" for method in grid["text"]["methods"]), "evaluate", "tables",
    }
    assert set(pd.read_csv(root / "reports/tables/accuracy.csv").n_runs) == {len(grid["vision"]["seeds"])} == {len(grid["text"]["seeds"])}


def test_pooled_runs_equal_one_at_a_time(repo) -> None:
    """`make repro` trains on a pool whose workers run one stage after another in the same process;
    `dvc repro` starts a fresh process per stage. The weights are the same bytes, the accuracies equal."""
    root, env, _ = repo
    outputs = {
        "train@mnist5k-vgg-bp-0": "runs/mnist5k-vgg-bp-s0", "train@mnist5k-vgg-early_exit-0": "runs/mnist5k-vgg-early_exit-s0",
        "train_text@bbcnews-transformer-early_exit-0": "runs/bbcnews-transformer-early_exit-s0",
        "train_local@cascade-2-0": "runs_local/mnist5k-vgg-cascade-k2-s0",
    }

    def results(folder: str) -> tuple[bytes, dict]:
        metrics = json.loads((root / folder / "metrics.json").read_text())
        return (root / folder / "model.pt").read_bytes(), {key: value for key, value in metrics.items() if "acc" in key}

    pooled = {stage: results(folder) for stage, folder in outputs.items()}
    sh(["dvc", "repro", "--force", "--single-item", *outputs], root, env)
    assert {stage: results(folder) for stage, folder in outputs.items()} == pooled
    sh(["dvc", "repro"], root, env)  # the tables again: the forced runs' timings differ (order-free tests)


def test_a_new_seed_trains_as_a_slurm_array(repo, slurm) -> None:
    """`python -m scpl_kit.submit launcher=slurm repro` on a real one-node Slurm: the stale training
    stages run as one array job, then one job records them (dvc commit) and runs the rest."""
    root, env, _ = repo
    grid, _ = add_seed(root, ("vision",))
    launcher = ["launcher=slurm", "launcher.wait=true", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1", "launcher.mem_gb=null"]
    printed = sh(["python", "-m", "scpl_kit.submit", *launcher, "repro"], root, {**env, "SLURM_CONF": str(slurm.conf)})
    n = len(grid["vision"]["methods"])
    assert f"0 upstream stage(s), {n} training stage(s) as an array" in printed
    scripts = [path.read_text() for path in (root / "outputs/jobs").glob("*_submission.sh")]
    assert sum(f"--array=0-{n - 1}" in script for script in scripts) == 1 and sum("--dependency=afterok:" in script for script in scripts) == 1
    logs = "".join(path.read_text() for path in (root / "outputs/jobs").glob("*_log.*"))
    assert stages_run(logs) == {"evaluate", "tables"}  # the training stages ran in the array, not again
    assert "up to date" in sh(["dvc", "status"], root, env)
    accuracy = pd.read_csv(root / "reports/tables/accuracy.csv")
    assert set(accuracy[accuracy.dataset == "mnist5k"].n_runs) == {len(grid["vision"]["seeds"])}


def test_dvc_exp_run_with_set_param(repo) -> None:
    root, env, _ = repo
    original = (root / "params.yaml").read_text()
    sh(["git", "add", "-A"], root, env)
    # --allow-empty: an earlier test of this module may have committed the results already (test order varies with xdist's grouping).
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "before the experiment"], root, env)
    try:
        ran = stages_run(sh(["dvc", "exp", "run", "-S", "grid.vision.methods=[early_exit]", "-S", "grid.text.methods=[early_exit]"], root, env))
        assert ran == {"evaluate", "tables"}  # the early_exit runs exist already; only the evaluations and tables change
        assert list(pd.read_csv(root / "reports/tables/accuracy.csv").method) == ["early_exit", "early_exit"]  # MNIST-5k, BBC News
        assert "grid.vision.methods" in sh(["dvc", "exp", "show", "--md"], root, env)
    finally:  # the experiment was applied to the workspace: back to the grid the other tests expect
        (root / "params.yaml").write_text(original)
        sh(["dvc", "repro"], root, env)


def test_the_paper_grid_is_one_parameter_away(repo) -> None:
    """`grid: *paper` in the repository's own params.yaml: every dataset × model × method × seed of the
    paper's vision and text grids becomes a train stage (a dry run: no data, no GPU)."""
    root, env, _ = repo
    original = (root / "params.yaml").read_text()
    params_text = (REPO / "params.yaml").read_text()
    assert params_text.rstrip().endswith("grid: *offline")
    (root / "params.yaml").write_text(params_text.rstrip().removesuffix("*offline") + "*paper\n")
    try:
        planned = stages_run(sh(["dvc", "repro", "--dry", "--force"], root, env))
    finally:
        (root / "params.yaml").write_text(original)
    paper = yaml.safe_load(params_text)["grids"]["paper"]
    vision, text = paper["vision"], paper["text"]
    assert vision["profile"] == "paper" and set(vision["datasets"]) == {"cifar10", "cifar100", "tinyimagenet"}
    assert set(vision["models"]) == {"vgg", "resnet18"} and {"bp", "scpl", "early_exit", "al", "bp_gpipe", "deinforeg", "auglocal", "predsim"} <= set(vision["methods"])
    assert text["profile"] == "paper_text" and set(text["datasets"]) == {"agnews", "dbpedia14", "imdb", "sst2"}
    assert set(text["models"]) == {"lstm", "transformer"} and len(vision["seeds"]) == len(text["seeds"]) == 5
    assert {"bp", "scpl", "early_exit", "al", "bp_gpipe", "deinforeg"} <= set(text["methods"])
    for stage, part, runs in (("train", vision, 240), ("train_text", text, 240)):
        wanted = {f"{stage}@{d}-{m}-{method}-{s}" for d in part["datasets"] for m in part["models"] for method in part["methods"] for s in part["seeds"]}
        assert wanted <= planned and len(wanted) == runs
    assert {f"prepare@{d}" for d in vision["datasets"]} | {f"prepare_text@{d}" for d in text["datasets"]} <= planned
    local = paper["local_k"]  # InfoPro's CIFAR-10 ResNet-32 at K = 2, 4, 8, 16, every local method, BP at K = 1
    assert (local["dataset"], local["model"], local["ks"]) == ("cifar10", "resnet32", [2, 4, 8, 16]) and local["dataset"] in vision["datasets"]
    wanted = {f"train_local@{method}-{k}-{s}" for method in local["methods"] for k in local["ks"] for s in local["seeds"]}
    assert wanted | {f"train_local_e2e@{s}" for s in local["seeds"]} | {"local_k"} <= planned and len(wanted) == 132
