"""Bad input fails fast, in one line that names the key or file, with exit code 2, no traceback, and no
MLflow run left RUNNING.

Two tables. CASES runs the real command in a fresh process, as a user would (slow: ≈ 4 s of imports a
case). DOORS calls every entry point's `main(argv)` in this process (seconds for all of them): prepare,
evaluate, sweep, submit, the report modules DVC runs, the benches, and train's values that parse but
cannot be met; each must also leave its folder exactly as it found it.
"""

import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from scpl_kit.config import compose_config
from scpl_kit.engines.launch import free_port
from scpl_kit.models import build_model
from scpl_kit.train import options

REPO = Path(__file__).resolve().parents[1]

# (command, overrides, environment, what the one line must name). {tmp}, {data}, {port} are filled in.
CASES = {
    "unreachable tracking server": ("train", [], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}, "MLflow tracking server http://127.0.0.1:{port} does not answer"),
    "unwritable sqlite store": ("train", ["tracking.uri=sqlite:///{tmp}/a_file/mlflow.db"], {}, "MLflow store {tmp}/a_file/mlflow.db"),
    "unwritable out_dir": ("train", ["out_dir={tmp}/a_file/out"], {}, "out_dir={tmp}/a_file/out is not a writable folder"),
    "unwritable checkpoint_dir": ("train", ["trainer.checkpoint_dir={tmp}/a_file/ckpt"], {}, "trainer.checkpoint_dir={tmp}/a_file/ckpt"),
    "zero epochs": ("train", ["trainer.epochs=0"], {}, "trainer.epochs=0: expected an integer ≥ 1"),
    "epochs not a number": ("train", ["trainer.epochs=abc"], {}, "trainer.epochs='abc': expected an integer"),
    "seed not a number": ("train", ["seed=abc"], {}, "seed='abc': expected an integer"),
    "zero batch": ("train", ["trainer.batch_size=0"], {}, "trainer.batch_size=0"),
    "zero width": ("train", ["model.width=0"], {}, "model.width=0: expected a number > 0"),
    "exchange schedule neither steps nor epoch": ("train", ["engine=hierarchical", "engine.average_every=weekly"], {},
                                                  "engine.average_every='weekly': expected an integer ≥ 1 or 'epoch'"),
    "batch larger than the training set": ("train", ["trainer.batch_size=5000"], {}, "trainer.batch_size=5000 is larger than the training split of mnist5k (3500 samples)"),
    "pipeline without torchrun": ("train", ["engine=pipeline"], {}, "run: torchrun --nproc-per-node 2 -m scpl_kit.train"),
    "truncated meta.json": ("train", ["data.processed_dir={tmp}/truncated"], {}, "{tmp}/truncated/mnist5k/meta.json is unreadable"),
    "unprepared dataset": ("train", ["data=cifar10", "data.processed_dir={tmp}/empty"], {}, "prepare it with `python -m scpl_kit.prepare data=cifar10 data.processed_dir={tmp}/empty`"),
    "missing SCPL_DATA_DIR": ("prepare", ["data=cifar10"], {"SCPL_DATA_DIR": "{tmp}/nonexistent"}, "data.raw_dir={tmp}/nonexistent (from SCPL_DATA_DIR or the config) is not a folder"),
    "unknown sweep metric": ("sweep", ["sweep=scpl_tau_lr", "sweep.metric=test_acc", "sweep.storage=sqlite:///{tmp}/optuna.db"], {}, "selects on validation only"),
    "unreachable tracking server (sweep)": ("sweep", ["sweep=scpl_tau_lr", "sweep.storage=sqlite:///{tmp}/optuna.db", "tracking.uri=http://127.0.0.1:{port}"], {}, "MLflow tracking server http://127.0.0.1:{port} does not answer"),
    "option the method does not have": ("train", ["method=early_exit", "+method.temperature=0.1"], {}, "method 'early_exit' has no option 'temperature'; valid options: classifier, pool, hidden"),
    "model too deep for the input": ("train", ["model.blocks=[[4,M],[4,M],[4,M],[4,M],[4,M]]"], {}, "model 'vgg' needs inputs of at least 32×32, got 28×28"),
    "one block for a decoupled method": ("train", ["method=al", "model.blocks=[[4,M]]"], {}, "method al trains blocks separately, but the model has 1 block"),
    "more modules than layers": ("train", ["method=dgl", "method.modules=7"], {}, "method.modules=7 does not fit this model: it has 6 layers, so K can be 1..6"),
    "cut points out of order": ("train", ["method=scpl", "method.cuts=[4,2]"], {}, "method.cuts [4, 2] must be increasing layer indices in 1..5"),
    "incomplete Tiny-ImageNet copy": ("prepare", ["data=tinyimagenet"], {"SCPL_DATA_DIR": "{tmp}/incomplete"}, "the tinyimagenet copy at {tmp}/incomplete/tiny-imagenet-200 is incomplete: words.txt is missing"),
    "unwritable sweep storage": ("sweep", ["sweep=scpl_tau_lr", "sweep.storage=sqlite:///{tmp}/a_file/optuna.db"], {}, "Optuna storage {tmp}/a_file/optuna.db"),
    # Text: a GloVe file of the wrong width or none at all, and training against data prepared otherwise.
    "GloVe file of the wrong dimension": ("prepare", ["data=bbcnews", "data.glove={tmp}/glove.6B.300d.txt", "data.processed_dir={tmp}/p"], {},
                                          "{tmp}/glove.6B.300d.txt line 1 has 50 numbers after its word, not data.glove_dim=300"),
    "missing GloVe file": ("prepare", ["data=bbcnews", "data.glove={tmp}/nonexistent/glove.txt", "data.processed_dir={tmp}/p"], {},
                           "data.glove={tmp}/nonexistent/glove.txt is not a file"),
    "text prepared with another max_len": ("train", ["profile=smoke_text", "data.processed_dir={text}", "data.max_len=64"], {},
                                           "was prepared with max_len=32 but the config asks for 64; prepare it with `python -m scpl_kit.prepare data=bbcnews data.max_len=64"),
    "a method for image models on text": ("train", ["profile=smoke_text", "data.processed_dir={text}", "method=infopro"], {},
                                          "method infopro needs an image model whose cut points are feature maps"),
    "image augmentation on text": ("train", ["profile=smoke_text", "data.processed_dir={text}", "trainer.augmentation=weak"], {},
                                   "trainer.augmentation=weak transforms images, but bbcnews is text"),
}


@pytest.fixture
def workspace(tmp_path: Path, processed_dir: Path, text_processed_dir: Path) -> dict[str, str]:
    (tmp_path / "a_file").write_text("a file where a folder is expected\n")
    (tmp_path / "glove.6B.300d.txt").write_text("the " + " ".join(["0.1"] * 50) + "\n")  # named 300d, holds 50-d vectors
    truncated = tmp_path / "truncated"
    shutil.copytree(processed_dir / "mnist5k", truncated / "mnist5k")
    meta = truncated / "mnist5k" / "meta.json"
    meta.write_text(meta.read_text()[:100])
    (tmp_path / "incomplete" / "tiny-imagenet-200").mkdir(parents=True)  # unzipped only in part: nothing but wnids.txt
    (tmp_path / "incomplete" / "tiny-imagenet-200" / "wnids.txt").write_text("n01443537\n")
    return {"tmp": str(tmp_path), "data": str(processed_dir), "text": str(text_processed_dir), "port": str(free_port())}


def fill(text: str, values: dict[str, str]) -> str:
    return text.format(**values)


@pytest.mark.slow  # a process per case (≈ 4 s of imports each)
@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_fast_in_one_line(case: str, workspace: dict[str, str], tmp_path: Path) -> None:
    command, overrides, extra_env, named = CASES[case]
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    defaults = [] if command == "prepare" else [
        "profile=smoke", f"data.processed_dir={workspace['data']}", f"out_dir={tmp_path / 'out'}",
        f"trainer.checkpoint_dir={tmp_path / 'ckpt'}", "tracking.enabled=true", f"tracking.uri={store}",
    ]
    if "MLFLOW_TRACKING_URI" in extra_env:
        defaults.append("tracking.uri=null")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SCPL_", "RANK"))}
    env.update({k: fill(v, workspace) for k, v in extra_env.items()})
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", f"scpl_kit.{command}", *defaults, *(fill(o, workspace) for o in overrides)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    took = time.monotonic() - start
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert fill(named, workspace) in lines[0]
    assert took < 30, f"took {took:.0f} s to fail"
    assert not (tmp_path / "nonexistent").exists()  # a missing data folder is reported, never created
    # Stopped before any MLflow run (or store) was created, so none is left RUNNING. Errors after a run
    # opened end it FAILED or KILLED: tests/test_training.py.
    assert not (tmp_path / "mlflow.db").exists()


# -- every door, in process ------------------------------------------------------------------------------------

SWEEP = ["sweep=scpl_tau_lr", "profile=smoke", "data.processed_dir={data}", "sweep.storage=sqlite:///{tmp}/optuna.db",
         "tracking.uri=sqlite:///{tmp}/mlflow.db", "sweep.output_dir={tmp}/trials"]
TRAIN = ["profile=smoke", "data.processed_dir={data}", "out_dir={tmp}/out", "trainer.checkpoint_dir={tmp}/ckpt", "tracking.uri=sqlite:///{tmp}/mlflow.db"]
GRID = {  # a small params.yaml of our own: the repository's grid changes as the project does
    "grid": {
        "vision": {"profile": "offline", "datasets": ["mnist5k"], "models": ["vgg"], "methods": ["bp"], "seeds": [0]},
        "local_k": {"profile": "offline_local", "dataset": "mnist5k", "model": "vgg", "methods": ["dgl"], "ks": [2], "seeds": [0]},
    },
}

# entry point → (argv, environment, what the one line must name). {tmp}, {data} are filled in; {tmp}/bin is an
# empty folder, so PATH={tmp}/bin is a machine without Slurm's or DVC's programs whether or not this one has them.
DOORS = {
    # prepare: fractions and sizes that parse but cannot be met, an output folder that cannot be, a split too small
    "prepare: a fraction above 1": ("prepare", ["data.val_fraction=1.5", "data.processed_dir={tmp}/p"], {}, "data.val_fraction=1.5: expected a number > 0 and < 1"),
    "prepare: fractions that leave no training split": ("prepare", ["data.val_fraction=0.5", "data.test_fraction=0.5", "data.processed_dir={tmp}/p"], {},
                                                        "data.val_fraction=0.5 + data.test_fraction=0.5 = 1 leaves nothing to train on"),
    "prepare: split seed not a number": ("prepare", ["data.split_seed=abc", "data.processed_dir={tmp}/p"], {}, "data.split_seed='abc': expected an integer ≥ 0"),
    "prepare: vocabulary too small": ("prepare", ["profile=smoke_text", "data.vocab_size=2", "data.processed_dir={tmp}/p"], {}, "data.vocab_size=2: expected an integer ≥ 3"),
    "prepare: processed_dir under a file": ("prepare", ["data.processed_dir={tmp}/a_file/p"], {}, "data.processed_dir={tmp}/a_file/p is not a writable folder"),
    "prepare: a split too small for every class": ("prepare", ["data.val_fraction=0.0001", "data.processed_dir={tmp}/p"], {},
                                                   "data.val_fraction=0.0001, data.test_fraction=0.2: a split of mnist5k would be too small to hold every class"),
    "prepare: unknown dataset": ("prepare", ["data=mnist", "data.processed_dir={tmp}/p"], {}, "Could not find 'data/mnist'; available options in 'data': agnews, bbcnews"),
    # evaluate: run folders and params files that are not there, or not what they should be
    "evaluate: no run folder": ("evaluate", ["{tmp}/runs/nothing", "{tmp}/eval/report.json"], {}, "run folder {tmp}/runs/nothing does not exist"),
    "evaluate: a run folder without weights": ("evaluate", ["{tmp}/half", "{tmp}/eval/report.json"], {}, "run folder {tmp}/half has no model.pt"),
    "evaluate: output under a file": ("evaluate", ["{tmp}/done/mnist5k-vgg-bp-s0", "{tmp}/a_file/report.json"], {}, "output={tmp}/a_file/report.json cannot be written"),
    "evaluate: no arguments": ("evaluate", [], {}, "give a run folder and an output file, or --params"),
    "evaluate: --params missing": ("evaluate", ["--params", "{tmp}/nonexistent.yaml"], {}, "--params={tmp}/nonexistent.yaml is not a file"),
    "evaluate: --params without a grid": ("evaluate", ["--params", "{tmp}/no_grid.yaml"], {}, "--params={tmp}/no_grid.yaml has no `grid` section"),
    "evaluate: a grid without methods": ("evaluate", ["--params", "{tmp}/no_methods.yaml"], {}, "grid.vision.methods is missing: expected a list"),
    "evaluate: --runs missing": ("evaluate", ["--params", "{tmp}/params.yaml", "--runs", "{tmp}/nonexistent"], {}, "--runs={tmp}/nonexistent is not a folder"),
    "evaluate: runs not trained": ("evaluate", ["--params", "{tmp}/params.yaml", "--runs", "{tmp}/runs"], {}, "--runs: run folder {tmp}/runs/mnist5k-vgg-bp-s0 does not exist"),
    "evaluate: --out under a file": ("evaluate", ["--params", "{tmp}/params.yaml", "--runs", "{tmp}/done", "--out", "{tmp}/a_file/eval"], {}, "--out={tmp}/a_file/eval is not a writable folder"),
    # sweep: the study's own values, a space a run cannot take, data that is not there, folders that cannot be written
    "sweep: n_trials not a number": ("sweep", [*SWEEP, "sweep.n_trials=abc"], {}, "sweep.n_trials='abc': expected an integer ≥ 1"),
    "sweep: zero heartbeat": ("sweep", [*SWEEP, "sweep.heartbeat_s=0"], {}, "sweep.heartbeat_s=0: expected an integer ≥ 1"),
    "sweep: unknown direction": ("sweep", [*SWEEP, "sweep.direction=up"], {}, "sweep.direction='up'; valid directions: maximize, minimize"),
    "sweep: unknown sampler": ("sweep", [*SWEEP, "sweep.sampler.name=grid"], {}, "sweep.sampler.name='grid': unknown sampler; valid samplers: tpe, random"),
    "sweep: a space below a key's range": ("sweep", [*SWEEP, "sweep.space={{optimizer.lr: {{type: float, low: -1, high: 0.1, log: false}}}}"], {},
                                           "sweep.space.optimizer.lr can draw -1, but optimizer.lr expects a number > 0"),
    "sweep: a space with low above high": ("sweep", [*SWEEP, "sweep.space={{optimizer.lr: {{type: float, low: 0.1, high: 0.01}}}}"], {}, "sweep.space.optimizer.lr: low=0.1 is above high=0.01"),
    "sweep: a space over a key the method lacks": ("sweep", [*SWEEP, "sweep.fixed=['method=bp']"], {},
                                                   "sweep.space.method.temperature: 'method.temperature' is not a key of the training config"),
    "sweep: unprepared data": ("sweep", [*SWEEP, "data.processed_dir={tmp}/nonexistent"], {}, "prepared data for 'mnist5k' not found at {tmp}/nonexistent/mnist5k"),
    "sweep: batch larger than the data": ("sweep", [*SWEEP, "trainer.batch_size=5000"], {}, "trainer.batch_size=5000 is larger than the training split of mnist5k"),
    "sweep: export folder under a file": ("sweep", [*SWEEP, "sweep.export_dir={tmp}/a_file/method"], {}, "sweep.export_dir={tmp}/a_file/method is not a writable folder"),
    "sweep: two studies": ("sweep", [*SWEEP, "sweep=bp_lr"], {}, "name the study once, with sweep=<name>"),
    "sweep: unknown study": ("sweep", ["sweep=tau", *SWEEP[1:]], {}, "Could not find 'sweep/tau'; available options in 'sweep': bp_lr, scpl_tau_lr"),
    # submit: the launcher's values, a folder for its logs, the programs it needs, the training config it queues
    "submit: launcher=slurm without Slurm": ("submit", ["launcher=slurm", "train", *TRAIN], {"PATH": "{tmp}/bin"}, "launcher=slurm needs sbatch and srun, which this machine does not have on PATH"),
    "submit: repro without dvc": ("submit", ["repro"], {"PATH": "{tmp}/bin"}, "repro runs `dvc`, which is not on PATH"),
    "submit: nodes not a number": ("submit", ["launcher.nodes=abc", "train", *TRAIN], {}, "launcher.nodes='abc': expected an integer ≥ 1"),
    "submit: two nodes on this machine": ("submit", ["launcher.nodes=2", "train", *TRAIN], {}, "launcher.nodes=2: the local launcher runs jobs on this machine only"),
    "submit: zero GPUs asked as -1": ("submit", ["launcher.gpus_per_node=-1", "train", *TRAIN], {}, "launcher.gpus_per_node=-1: expected an integer ≥ 0 or null"),
    "submit: job folder under a file": ("submit", ["launcher.folder={tmp}/a_file/jobs", "train", *TRAIN], {}, "launcher.folder={tmp}/a_file/jobs is not a writable folder"),
    "submit: a training value out of range": ("submit", ["train", *TRAIN, "trainer.epochs=0"], {}, "trainer.epochs=0: expected an integer ≥ 1"),
    "submit: unknown launcher": ("submit", ["launcher=pbs", "train", *TRAIN], {}, "Could not find 'launcher/pbs'; available options in 'launcher': local, slurm"),
    "submit: nothing to submit": ("submit", [], {}, "the following arguments are required: arguments"),
    # the report modules DVC runs
    "tables: --params missing": ("tables", ["--params", "{tmp}/nonexistent.yaml"], {}, "--params={tmp}/nonexistent.yaml is not a file"),
    "tables: --runs missing": ("tables", ["--params", "{tmp}/params.yaml", "--runs", "{tmp}/nonexistent"], {}, "--runs={tmp}/nonexistent is not a folder"),
    "tables: runs not trained": ("tables", ["--params", "{tmp}/params.yaml", "--runs", "{tmp}/runs"], {}, "--runs: {tmp}/runs/mnist5k-vgg-bp-s0 has no metrics.json"),
    "tables: --out under a file": ("tables", ["--params", "{tmp}/params.yaml", "--runs", "{tmp}/done", "--out", "{tmp}/a_file/reports"], {}, "--out={tmp}/a_file/reports is not a writable folder"),
    "local_k: --params without grid.local_k": ("local_k", ["--params", "{tmp}/no_grid.yaml"], {}, "--params={tmp}/no_grid.yaml has no `grid.local_k` section"),
    "local_k: a part without ks": ("local_k", ["--params", "{tmp}/no_ks.yaml"], {}, "grid.local_k.ks is missing: expected a list"),
    "local_k: runs not trained": ("local_k", ["--params", "{tmp}/params.yaml", "--runs", "{tmp}/runs"], {}, "--runs: {tmp}/runs/mnist5k-vgg-bp-k1-s0 has no metrics.json"),
    "local_k: unreadable params": ("local_k", ["--params", "{tmp}/broken.yaml"], {}, "--params={tmp}/broken.yaml is not readable YAML"),
    # the benches
    "throughput: more workers than blocks": ("throughput", ["--workers", "5", "--out", "{tmp}/reports"], {}, "--workers 5: expected an integer ≥ 1 and ≤ 4"),
    "throughput: no rounds": ("throughput", ["--rounds", "0", "--out", "{tmp}/reports"], {}, "--rounds 0: expected an integer ≥ 1"),
    "throughput: an unknown row": ("throughput", ["--rows", "vgg_bp1", "vgg_bp9", "--out", "{tmp}/reports"], {}, "--rows: unknown vgg_bp9; valid: vgg_bp1, vgg_bp1_ckpt,"),
    "throughput: a misspelt override": ("throughput", ["--rows", "vgg_bp1", "--set", "trainer.batchsize=16", "--out", "{tmp}/reports"], {}, "--set: row vgg_bp1: "),
    "throughput: rounds not a number": ("throughput", ["--rounds", "abc"], {}, "argument --rounds: invalid int value: 'abc'"),
    "throughput: --out under a file": ("throughput", ["--out", "{tmp}/a_file/reports"], {}, "--out={tmp}/a_file/reports is not a writable folder"),
    "scaling: target above 1": ("scaling", ["--target", "2", "--processed-dir", "{data}", "--out", "{tmp}/reports"], {}, "--target 2.0: expected a number > 0 and ≤ 1"),
    "scaling: target 0": ("scaling", ["--target", "0", "--processed-dir", "{data}", "--out", "{tmp}/reports"], {}, "--target 0.0: expected a number > 0 and ≤ 1"),
    "scaling: zero ranks per node": ("scaling", ["--ranks-per-node", "0", "--processed-dir", "{data}", "--out", "{tmp}/reports"], {}, "--ranks-per-node 0: expected an integer ≥ 1"),
    "scaling: zero micro-batches": ("scaling", ["--microbatches", "0", "--processed-dir", "{data}", "--out", "{tmp}/reports"], {}, "--microbatches 0: expected an integer ≥ 1"),
    "scaling: zero width": ("scaling", ["--width", "0", "--processed-dir", "{data}", "--out", "{tmp}/reports"], {}, "--width 0.0: expected a number > 0"),
    "scaling: a worker sped up": ("scaling", ["--slowdown", "0.5", "--processed-dir", "{data}", "--out", "{tmp}/reports"], {}, "--slowdown 0.5: expected a number ≥ 1"),
    "scaling: a batch the workers do not divide": ("scaling", ["--batch", "33", "--processed-dir", "{data}", "--out", "{tmp}/reports"], {}, "--batch 33 must be a multiple of --workers 2"),
    "scaling: unprepared data": ("scaling", ["--processed-dir", "{tmp}/nonexistent", "--out", "{tmp}/reports"], {}, "--processed-dir {tmp}/nonexistent: prepared data for 'mnist5k' not found"),
    "scaling: batch larger than the data": ("scaling", ["--batch", "5000", "--processed-dir", "{data}", "--out", "{tmp}/reports"], {}, "--batch 5000 is larger than the training split of mnist5k (3500 samples)"),
    "scaling: --out under a file": ("scaling", ["--processed-dir", "{data}", "--out", "{tmp}/a_file/reports"], {}, "--out={tmp}/a_file/reports is not a writable folder"),
    "scaling: unknown configuration": ("scaling", ["--configs", "ddp2"], {}, "argument --configs: invalid choice: 'ddp2'"),
    # train: values that parse, each in range or not, but cannot be met
    "train: fractions that leave no training split": ("train", [*TRAIN, "data.val_fraction=0.6", "data.test_fraction=0.5"], {},
                                                      "data.val_fraction=0.6 + data.test_fraction=0.5 = 1.1 leaves nothing to train on"),
    "train: zero attention heads": ("train", [*TRAIN, "profile=smoke_text", "model.heads=0"], {}, "model.heads=0: expected an integer ≥ 1"),
    "train: a target accuracy above 1": ("train", [*TRAIN, "trainer.stop_at_val_acc=1.5"], {}, "trainer.stop_at_val_acc=1.5: expected a number > 0 and ≤ 1 or null"),
    # the update step (conf/optimizer/)
    "train: an unknown optimizer group": ("train", [*TRAIN, "optimizer=adagrad"], {}, "Could not find 'optimizer/adagrad'; available options in 'optimizer': adam, adamw, infopro, sgd"),
    "train: an unknown optimizer": ("train", [*TRAIN, "optimizer.name=adagrad"], {}, "optimizer.name='adagrad': valid: adam, adamw, sgd"),
    "train: an unknown schedule": ("train", [*TRAIN, "optimizer.schedule=linear"], {}, "optimizer.schedule='linear': valid: constant, cosine, step, plateau"),
    "train: negative weight decay": ("train", [*TRAIN, "optimizer.weight_decay=-1e-4"], {}, "optimizer.weight_decay=-0.0001: expected a number ≥ 0"),
    "train: clipping at zero": ("train", [*TRAIN, "optimizer.clip_norm=0"], {}, "optimizer.clip_norm=0: expected a number > 0 or null"),
    "train: a warm-up as long as the run": ("train", [*TRAIN, "trainer.epochs=2", "optimizer.warmup_epochs=2"], {},
                                            "optimizer.warmup_epochs=2 is not shorter than the run (trainer.epochs=2)"),
    "train: nesterov without momentum": ("train", [*TRAIN, "optimizer=sgd", "optimizer.momentum=0"], {}, "optimizer.nesterov=true needs optimizer.name=sgd and optimizer.momentum > 0"),
    "train: an unknown optimizer key": ("train", [*TRAIN, "+optimizer.eps=1e-8"], {}, "optimizer has no key 'eps'; valid keys: name, lr, lr_min"),
}

MODULES = {
    "prepare": "scpl_kit.prepare", "evaluate": "scpl_kit.evaluate", "sweep": "scpl_kit.sweep", "submit": "scpl_kit.submit", "train": "scpl_kit.train",
    "tables": "scpl_kit.report.tables", "local_k": "scpl_kit.report.local_k", "throughput": "throughput", "scaling": "scaling",
}


def entry_point(name: str) -> Callable[[list[str]], int]:
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))  # as `python bench/scaling.py` has it (scaling imports throughput)
    return importlib.import_module(MODULES[name]).main


@pytest.fixture
def doors(tmp_path: Path, processed_dir: Path) -> dict[str, str]:
    """Files and folders the cases name, all under tmp_path: a file where a folder is expected, an empty
    PATH, params files with and without what the commands read, and finished-looking run folders
    (their files empty: every case fails before reading them)."""
    (tmp_path / "a_file").write_text("a file where a folder is expected\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(GRID))
    (tmp_path / "no_grid.yaml").write_text("seed: 0\n")
    (tmp_path / "no_methods.yaml").write_text(yaml.safe_dump({"grid": {**GRID["grid"], "vision": {k: v for k, v in GRID["grid"]["vision"].items() if k != "methods"}}}))
    (tmp_path / "no_ks.yaml").write_text(yaml.safe_dump({"grid": {"local_k": {k: v for k, v in GRID["grid"]["local_k"].items() if k != "ks"}}}))
    (tmp_path / "broken.yaml").write_text("grid: [unclosed\n")
    for name in ("mnist5k-vgg-bp-s0",):
        (tmp_path / "done" / name).mkdir(parents=True)
        for file in ("config.yaml", "metrics.json", "model.pt", "history.csv"):
            (tmp_path / "done" / name / file).write_text("")
    (tmp_path / "half").mkdir()
    for file in ("config.yaml", "metrics.json"):
        (tmp_path / "half" / file).write_text("")
    return {"tmp": str(tmp_path), "data": str(processed_dir)}


def tree(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


@pytest.mark.parametrize("case", DOORS)
def test_every_entry_point_rejects_bad_input_in_one_line(case: str, doors: dict[str, str], tmp_path: Path, monkeypatch, capsys) -> None:
    command, argv, environment, named = DOORS[case]
    main = entry_point(command)
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "SCPL_", "RANK"))]:
        monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, fill(value, doors))
    monkeypatch.chdir(tmp_path)  # defaults (outputs/, reports/, runs/, optuna.db) land here, where the check below sees them
    before = tree(tmp_path)
    start = time.monotonic()
    try:
        code = main([fill(arg, doors) for arg in argv])
    except SystemExit as stop:  # argparse's errors leave through sys.exit
        code = stop.code
    took = time.monotonic() - start
    printed = capsys.readouterr()
    lines = [line for line in printed.err.splitlines() if line.strip()]
    assert code == 2, printed.err
    assert "Traceback" not in printed.out + printed.err
    assert len(lines) == 1 and lines[0].startswith("error: "), printed.err
    assert fill(named, doors) in lines[0], lines[0]
    assert tree(tmp_path) == before, "a rejected command wrote something"  # nothing trained, prepared, queued or created
    assert took < 15, f"took {took:.0f} s to fail"


def test_the_smallest_width_keeps_a_channel_in_every_layer() -> None:
    """model.width has no floor above 0: the image models round each layer's channels to at least 1
    (max(1, round(channels × width))), so no layer is rounded away; ≤ 0 is preflight's to refuse."""
    for name, shape in (("vgg", (1, 28, 28)), ("resnet18", (3, 32, 32)), ("resnet32", (3, 32, 32))):
        cfg = compose_config([f"model={name}", "model.width=0.001"])
        model = build_model(name, shape, 10, **options(cfg.model))
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and min(conv.out_channels for conv in convs) == 1, name
