"""Bad input fails fast, in one line that names the key or file, with exit code 2, no traceback, and no
MLflow run left RUNNING: each case runs the real command in a fresh process, as a user would."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scpl_kit.engines.launch import free_port

pytestmark = pytest.mark.slow  # a process per case (≈ 4 s of imports each)

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
