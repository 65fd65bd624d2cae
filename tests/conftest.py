from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from scpl_kit.stage_pool import share_cores  # no torch: it must run before torch starts its thread pool

# Under pytest-xdist each worker gets its share of the cores, as the stage pool's workers do (inherited
# by the processes tests start): two workers of two OpenMP threads each on 2 cores spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    share_cores(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))

import optuna
import pytest
import yaml
from omegaconf import DictConfig

from scpl_kit.config import compose_config
from scpl_kit.data.prepare import prepare_dataset
from scpl_kit.data.sources import source_options

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST-5k prepared once per test session (real data, ~4 s)."""
    out = tmp_path_factory.mktemp("processed")
    prepare_dataset("mnist5k", out, out / "raw", val_fraction=0.1, test_fraction=0.2, split_seed=0, download=False)
    return out


@pytest.fixture(scope="session")
def text_processed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BBC News prepared once per test session as the `smoke_text` profile asks (real data, short documents)."""
    out = tmp_path_factory.mktemp("processed_text")
    data = compose_config(["profile=smoke_text"], config_name="prepare").data
    prepare_dataset("bbcnews", out, out / "raw", val_fraction=0.1, test_fraction=0.2, split_seed=0, download=False, **source_options("bbcnews", data))
    return out


@pytest.fixture(scope="session")
def synthetic_processed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benches' random CIFAR-10- and AG-News-shaped data, prepared as conf/data/synthetic_*.yaml say (~3 s)."""
    out = tmp_path_factory.mktemp("processed_synthetic")
    for name in ("synthetic_cifar10", "synthetic_agnews"):
        data = compose_config([f"data={name}"], config_name="prepare").data
        prepare_dataset(name, out, out / "raw", val_fraction=data.val_fraction, test_fraction=data.test_fraction, split_seed=0, download=False,
                        **source_options(name, data))
    return out


_SEQUENTIAL_RUNS: dict[tuple[str, ...], Path] = {}


def sequential_run(make: Callable[..., DictConfig], out_dir: Path, *overrides: str) -> Path:
    """The sequential engine's run of `overrides` (one thread), computed once per test session: the
    reference every engine-equivalence test compares against. Runs are deterministic, so each test
    would compute the same files again (about 8 s each on 2 cores)."""
    from scpl_kit.train import run

    key = (make.profile, *overrides)  # type: ignore[attr-defined]
    if key not in _SEQUENTIAL_RUNS:
        run(make(*overrides, "trainer.threads=1", f"out_dir={out_dir}"))
        _SEQUENTIAL_RUNS[key] = out_dir
    return _SEQUENTIAL_RUNS[key]


def composer(profile: str, processed_dir: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str) -> DictConfig:
        return compose_config([
            f"profile={profile}",
            f"data.processed_dir={processed_dir}",
            f"out_dir={tmp_path / 'out'}",
            f"trainer.checkpoint_dir={tmp_path / 'checkpoints'}",
            "trainer.progress=false",
            "tracking.enabled=false",
            *overrides,
        ])

    make.profile = profile  # type: ignore[attr-defined]
    return make


@pytest.fixture
def smoke_config(processed_dir: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose the `smoke` profile with every file it writes under tmp_path and tracking off."""
    return composer("smoke", processed_dir, tmp_path)


@pytest.fixture
def text_smoke_config(text_processed_dir: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """The same for text: the `smoke_text` profile (a tiny Transformer or LSTM on BBC News)."""
    return composer("smoke_text", text_processed_dir, tmp_path)


SPACE = {"method.temperature": {"type": "float", "low": 0.05, "high": 0.5, "log": True}, "optimizer.lr": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True}}


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


def load_study(env: dict) -> optuna.Study:
    """The one study in the test's storage (named `tiny-<profile>-<config hash>`)."""
    (name,) = optuna.get_all_study_names(env["storage"])
    assert name.startswith("tiny-smoke-")
    return optuna.load_study(study_name=name, storage=env["storage"])


# Fixtures that start a real component: a test using one needs it, marked or not.
FIXTURE_NEEDS = {"slurm": "needs_slurm", "postgres": "needs_postgres"}
# `make test` runs the suite on pytest-xdist workers (--dist loadgroup): the modules whose tests share a
# server or a reproduced pipeline stay together on one worker, so each is started once. Other modules'
# tests may run between theirs there, so what is expensive to make is a session fixture (a module
# fixture is torn down, and made again, at each such switch). Two groups may each start a Slurm cluster: every cluster has its own folder and
# ports, and stops only its own job steps (tests/services.py).
ONE_WORKER = {"test_cluster.py": "cluster", "test_pipeline.py": "pipeline", "test_ui.py": "ui"}


def keep_on_one_worker(item: pytest.Item, group: str, config: pytest.Config) -> None:
    """Put `item` in pytest-xdist's `group`. xdist 3.8 groups by appending `@<group>` to `item._nodeid`,
    which pytest 9.2 no longer reads (a node's id is `item._id`): the groups were ignored and their tests
    spread over both workers (CI's durations showed each module fixture made twice). Done here, on the
    id pytest reads, until xdist follows; an id that gets `@<group>` twice still groups alike."""
    item.add_marker(pytest.mark.xdist_group(group))
    if getattr(config.option, "loadgroup", False) and "@" not in item.nodeid:
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(f"{item.nodeid}@{group}")


# tryfirst: before pytest-xdist's own hook, which reads the groups.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip what needs a missing component, saying how to get it (scripts/test-services installs them all)."""
    from services import COMPONENTS

    missing = {marker: install for marker, (present, install) in COMPONENTS.items() if not present()}
    for item in items:
        if item.path.name in ONE_WORKER:
            keep_on_one_worker(item, ONE_WORKER[item.path.name], config)
        for fixture, marker in FIXTURE_NEEDS.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)
        for marker, install in missing.items():
            if item.get_closest_marker(marker) and not os.environ.get("CI"):
                item.add_marker(pytest.mark.skip(reason=f"{marker}: not installed here ({install}; or run `sudo make test`)"))


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A real one-node Slurm cluster for this test session (tests/services.py); its clients need `slurm.env`."""
    from services import Slurm

    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()
