"""The `async_sgd` engine (bounded-staleness asynchronous SGD): speed-proportional shares of each epoch, asynchronous pushes and pulls
to a parameter server with bounded staleness, one model at every epoch's end. Two ranks on the CPU."""

import hashlib
import json
import os
import time
import traceback
from pathlib import Path

import pandas as pd
import pytest
import torch

from scpl_kit.engines import build_engine
from scpl_kit.engines.async_sgd import interleaved_owners
from scpl_kit.engines.launch import set_rank_env
from scpl_kit.methods import build_units
from scpl_kit.models import build_model
from scpl_kit.train import run
from scpl_kit.updater import OptimizerSettings, UpdateRecipe

from test_engines import spawn_ranks

CLASSES, BATCH, TRAIN, TEST = 4, 16, 512, 256


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable 16×16 images: class c lights up quadrant c, under noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    images = 0.5 * torch.randn(n, 1, 16, 16, generator=g)
    for c in range(CLASSES):
        rows, cols = divmod(c, 2)
        images[labels == c, :, rows * 8:(rows + 1) * 8, cols * 8:(cols + 1) * 8] += 1.0
    return images, labels


def batches(images: torch.Tensor, labels: torch.Tensor, epoch: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's shuffled batches, the same on every rank (as the trainer's seeded loader gives them)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch)) if epoch is not None else torch.arange(len(labels))
    return [(images[i], labels[i]) for i in order.split(BATCH) if len(i) == BATCH]


def digest(units) -> str:
    h = hashlib.sha256()
    for unit in units:
        for name, tensor in unit.state_dict().items():
            h.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _train_main(rank: int, world: int, port: int, result_dir: str, method: str, epochs: int, options: dict) -> None:
    """One rank: the trainer's loop over epochs, reduced to the engine calls; what it saw, as JSON."""
    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model("vgg", (1, 16, 16), CLASSES, width=0.0625, predictor_hidden=16)
        units = build_units(method, model, CLASSES)
        engine = build_engine("async_sgd", timeout_s=60, **options)
        engine.setup(units, model.example_batch(BATCH, CLASSES), UpdateRecipe(OptimizerSettings(lr=3e-3), TRAIN // BATCH, epochs))
        train, test = synthetic(TRAIN, 1), synthetic(TEST, 2)
        records = []
        for epoch in range(1, epochs + 1):
            for unit in engine.units:
                unit.start_epoch(epoch, epochs)
            trained = []
            losses = engine.train_epoch(batches(*train, epoch), on_batch=trained.append)
            scores = engine.predict(batches(*test))["scores"]
            accuracy = float((scores.argmax(1) == test[1][: len(scores)]).float().mean())
            records.append({"losses": losses, "stats": engine.epoch_stats(), "trained": sum(trained), "acc": accuracy,
                            "digest": digest(engine.units)})
        report = {"records": records, "updates": engine.last_updates}
        engine.close()
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(report))
    except BaseException as error:
        Path(result_dir, f"rank{rank}.err").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise


def train_two_ranks(tmp_path: Path, method: str, epochs: int, **options) -> tuple[dict, dict]:
    reports = spawn_ranks(_train_main, 2, tmp_path, method, epochs, options)
    assert sorted(reports) == ["rank0.json", "rank1.json"], reports
    return json.loads(reports["rank0.json"]), json.loads(reports["rank1.json"])


def test_shares_follow_the_speeds_interleaved() -> None:
    owners = list(zip(range(100), interleaved_owners([0.75, 0.25])))
    assert sum(1 for _, k in owners if k == 1) == 25
    assert [k for _, k in owners[:8]] == [0, 0, 1, 0, 0, 0, 1, 0]  # spread over the epoch, not in one run
    assert [k for _, k in zip(range(6), interleaved_owners([0.5, 0.5]))] == [0, 1, 0, 1, 0, 1]


def test_a_slow_worker_gets_a_smaller_share_and_the_model_converges(tmp_path: Path) -> None:
    """Rank 1 slowed 3×: from its measured speed it gets a smaller share of each epoch, and rank 0
    trains more steps meanwhile; staleness stays within the bound and is reported; the ranks hold
    one model after every epoch; SCPL learns the easy data."""
    rank0, rank1 = train_two_ranks(tmp_path, "scpl", 3, max_staleness=4, slow_rank=1, slowdown=3.0)
    first, second = rank0["records"][0]["stats"], rank0["records"][1]["stats"]
    speeds = [first[f"async_sgd/rank{k}/samples_per_s"] for k in (0, 1)]  # measured in epoch 1
    assert second["async_sgd/rank1/share"] == pytest.approx(speeds[1] / sum(speeds)), (first, second)
    assert second["async_sgd/rank1/share"] < 0.4 < 0.6 < second["async_sgd/rank0/share"], (first, second)
    assert second["async_sgd/rank0/steps"] > second["async_sgd/rank1/steps"] > 0, second
    assert second["async_sgd/rank0/steps"] + second["async_sgd/rank1/steps"] == TRAIN // BATCH
    assert rank0["records"][1]["trained"] == BATCH * second["async_sgd/rank0/steps"]  # on_batch: this rank's samples
    assert rank1["records"][1]["trained"] == BATCH * second["async_sgd/rank1/steps"]
    for record in rank0["records"]:
        stats = record["stats"]
        assert 0 <= stats["async_sgd/staleness_mean"] <= stats["async_sgd/staleness_max"] <= 4 and stats["async_sgd/updates"] > 0
        assert stats["async_sgd/updates"] + stats["async_sgd/dropped"] == TRAIN // BATCH
    assert all(staleness <= 4 for _, staleness, applied in rank0["updates"] if applied)
    assert any(staleness > 0 for _, staleness, _ in rank0["updates"])  # asynchronous: the slow worker's pulls go stale
    assert [r["digest"] for r in rank0["records"]] == [r["digest"] for r in rank1["records"]]  # one model
    assert [r["acc"] for r in rank0["records"]] == [r["acc"] for r in rank1["records"]]
    assert rank0["records"][-1]["losses"]["predictor/ce"] < rank0["records"][0]["losses"]["predictor/ce"], rank0["records"]
    assert rank0["records"][-1]["acc"] > 0.9, rank0["records"]


def test_too_stale_updates_are_dropped_and_bp_runs(tmp_path: Path) -> None:
    """max_staleness=0: only updates made on the current global weights land; the slow worker's
    are mostly too stale and dropped (counted). push_every=2: a push per two local steps, and one
    for the epoch's last step if left over. BP trains under the engine as SCPL does."""
    rank0, rank1 = train_two_ranks(tmp_path, "bp", 2, max_staleness=0, push_every=2, slow_rank=1, slowdown=3.0)
    stats = rank0["records"][-1]["stats"]
    assert stats["async_sgd/dropped"] > 0 and stats["async_sgd/staleness_max"] == 0, (stats, rank0["updates"])
    for rank in (0, 1):
        pushes = sum(1 for worker, _, _ in rank0["updates"] if worker == rank)
        assert pushes == -(-stats[f"async_sgd/rank{rank}/steps"] // 2), (rank, pushes, stats)
    assert all(staleness == 0 for _, staleness, applied in rank0["updates"] if applied)
    assert all(staleness > 0 for _, staleness, applied in rank0["updates"] if not applied)
    assert rank0["records"][-1]["digest"] == rank1["records"][-1]["digest"]
    assert set(rank0["records"][-1]["losses"]) == {"predictor/ce"} and rank0["records"][-1]["acc"] > 0.9, rank0["records"]


def _dying_main(rank: int, world: int, port: int, result_dir: str, dies: int, fault: str, timeout_s: float) -> None:
    """Rank `dies` crashes without a word in the middle of the first epoch, or gets stuck there
    (alive, silent); the other must say so."""
    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model("vgg", (1, 16, 16), CLASSES, width=0.0625, predictor_hidden=16)
        units = build_units("bp", model, CLASSES)
        engine = build_engine("async_sgd", timeout_s=timeout_s)
        engine.setup(units, model.example_batch(BATCH, CLASSES), UpdateRecipe(OptimizerSettings(), 100, 1))

        def step(samples: int) -> None:
            if rank == dies and engine.units[0].steps == 3:
                if fault == "stuck":
                    time.sleep(timeout_s + 2)
                os._exit(3)

        started = time.time()
        try:
            for _ in range(20):  # far more than the timeout when nobody fails
                engine.train_epoch(batches(*synthetic(TRAIN, 1), 1), on_batch=step)
        finally:
            Path(result_dir, f"rank{rank}.time").write_text(str(time.time() - started))
            engine.close()
        Path(result_dir, f"rank{rank}.ok").write_text("ok")
    except BaseException as error:
        Path(result_dir, f"rank{rank}.err").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise


@pytest.mark.slow  # processes that time out a stuck peer or train every method: 20-60 s
@pytest.mark.parametrize(("dies", "fault"), [(0, "crash"), (1, "crash"), (0, "stuck")])
def test_a_dead_or_stuck_worker_stops_the_job_with_a_clear_error(tmp_path: Path, dies: int, fault: str) -> None:
    """The parameter server's rank or a plain worker dies: the other fails with PeerError at once. A
    stuck rank 0 still serves pushes and pulls (on RPC threads), so the other trains on and fails
    at the epoch's end, when it waits for the stuck one longer than engine.timeout_s."""
    timeout_s = 5.0
    reports = spawn_ranks(_dying_main, 2, tmp_path, dies, fault, timeout_s)
    survivor = 1 - dies
    assert f"rank{survivor}.err" in reports, reports
    assert reports[f"rank{survivor}.err"].startswith(f"PeerError: rank {survivor}: "), reports[f"rank{survivor}.err"]
    assert float(reports[f"rank{survivor}.time"]) < timeout_s + 10


def _run_main(rank: int, world: int, port: int, result_dir: str, cfg, stop_after: int | None) -> None:
    """The CLI's entry on each rank; `stop_after`: rank 0 dies (an exception) after that epoch's checkpoint."""
    from scpl_kit.tracking import TrainingListener

    class Crash(TrainingListener):
        def on_epoch_end(self, epoch: int, record: dict) -> None:
            if epoch == stop_after + 1:  # the epoch before has been checkpointed
                raise RuntimeError("simulated crash")

    set_rank_env(rank, world, port)
    try:
        run(cfg, listeners=[Crash()] if stop_after is not None else [])
        Path(result_dir, f"rank{rank}.ok").write_text("ok")
    except BaseException as error:
        Path(result_dir, f"rank{rank}.err").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise


def async_config(smoke_config, tmp_path: Path, *overrides: str):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return smoke_config("method=scpl", "trainer.threads=1", "engine=async_sgd", "engine.timeout_s=120", "tracking.enabled=true",
                        f"tracking.uri={uri}", *overrides), uri


def ranks_in(folder: Path, main, *args) -> dict[str, str]:
    folder.mkdir()
    return spawn_ranks(main, 2, folder, *args)
@pytest.mark.slow  # processes that time out a stuck peer or train every method: 20-60 s
def test_through_the_cli_with_tracking(smoke_config, tmp_path: Path) -> None:
    """`run(cfg)` on two ranks, as torchrun starts them: one set of outputs, the engine's statistics
    in every epoch's record and in MLflow, accuracy well above chance (0.1) after two short epochs."""
    from mlflow import MlflowClient

    cfg, uri = async_config(smoke_config, tmp_path)
    reports = ranks_in(tmp_path / "run", _run_main, cfg, None)
    assert sorted(reports) == ["rank0.ok", "rank1.ok"], reports
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["engine"] == "async_sgd" and metrics["engine_detail"] == "async_sgd K=2" and metrics["test_acc"] > 0.2
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"async_sgd/staleness_max", "async_sgd/dropped", "async_sgd/idle_s", "async_sgd/rank0/share", "async_sgd/rank1/steps"} <= set(history.columns)
    assert (history["async_sgd/rank0/steps"] + history["async_sgd/rank1/steps"] == history["async_sgd/updates"] + history["async_sgd/dropped"]).all()
    client = MlflowClient(uri)
    (only,) = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])  # one rank logs
    assert only.data.tags["engine"] == "async_sgd" and len(client.get_metric_history(only.info.run_id, "async_sgd/staleness_max")) == 2


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_checkpoint(smoke_config, tmp_path: Path) -> None:
    """Rank 0 fails after epoch 1's checkpoint; the rerun with trainer.resume loads it on every rank
    (and into the parameter server), trains epoch 2 only and completes the same MLflow run."""
    from mlflow import MlflowClient

    cfg, uri = async_config(smoke_config, tmp_path)
    reports = ranks_in(tmp_path / "first", _run_main, cfg, 1)
    assert "rank0.err" in reports and "simulated crash" in reports["rank0.err"], reports
    interrupted = pd.read_csv(tmp_path / "out" / "history.csv")
    assert list(interrupted["epoch"]) == [1]

    resumed, _ = async_config(smoke_config, tmp_path, "trainer.resume=true")
    reports = ranks_in(tmp_path / "second", _run_main, resumed, None)
    assert sorted(reports) == ["rank0.ok", "rank1.ok"], reports
    done = pd.read_csv(tmp_path / "out" / "history.csv")
    assert list(done["epoch"]) == [1, 2]
    assert done.iloc[0].to_dict() == interrupted.iloc[0].to_dict()  # epoch 1 from the checkpoint, not trained again
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["test_acc"] > 0.2
    client = MlflowClient(uri)
    (only,) = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])  # resumed into the same run
    assert only.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(only.info.run_id, "async_sgd/staleness_max")}) == [1, 2]
