"""Training end to end in-process on real MNIST-5k at smoke scale (seconds per run)."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from scpl_kit.evaluate import evaluate_run
from scpl_kit.methods import NonFiniteLossError
from scpl_kit.methods.heads import SupConHead
from scpl_kit.train import run
from scpl_kit.trainer import Trainer

TIMES = ("train_time_s", "epoch_time_s", "samples_per_s")


def history(out: Path) -> list[dict]:
    """Every epoch's record but what the engine measured of itself: its timings, traffic (`comm/`:
    engines differ there by design; tests/test_transport.py checks it) and, under trainer.measure,
    `time/` and `memory/`, and what a pipeline's timed split promised (`plan/`). A loss an epoch did not have (a cascade module waiting for its turn) is
    None, so two histories compare equal (NaN != NaN)."""
    records = pd.read_csv(out / "history.csv")
    records = records.drop(columns=[*TIMES, *(c for c in records.columns if c.startswith(("comm/", "time/", "memory/", "plan/")))])
    return records.astype(object).where(records.notna(), None).to_dict("records")


def weights(out: Path) -> list[dict]:
    return torch.load(out / "model.pt")["units"]


def same_weights(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.mark.parametrize("method", ["bp", "scpl"])
def test_same_seed_same_metrics_and_weights(smoke_config, tmp_path: Path, method: str) -> None:
    first = run(smoke_config(f"method={method}", f"out_dir={tmp_path / 'a'}"))
    second = run(smoke_config(f"method={method}", f"out_dir={tmp_path / 'b'}"))
    assert {k: v for k, v in first.items() if k not in TIMES} == {k: v for k, v in second.items() if k not in TIMES}
    assert history(tmp_path / "a") == history(tmp_path / "b")
    assert same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    third = run(smoke_config(f"method={method}", f"out_dir={tmp_path / 'c'}", "seed=1"))
    assert not same_weights(weights(tmp_path / "a"), weights(tmp_path / "c"))
    assert third["test_acc"] > 0.2  # well above chance (0.1) after two short epochs


def test_per_epoch_records(smoke_config, tmp_path: Path) -> None:
    run(smoke_config("method=scpl", "trainer.epochs=2"))
    rows = history(tmp_path / "out")
    assert [r["epoch"] for r in rows] == [1, 2]
    losses = {k for k in rows[0] if k.startswith("loss/")}
    assert losses == {f"loss/block{k}/supcon" for k in range(1, 5)} | {"loss/predictor/ce"}
    assert {"val_acc", "test_acc"} <= set(rows[0])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["method"] == "scpl" and metrics["samples_per_s"] > 0


def test_killed_run_resumes_to_the_same_result(smoke_config, tmp_path: Path, monkeypatch) -> None:
    reference = run(smoke_config("out_dir=" + str(tmp_path / "ref"), f"trainer.checkpoint_dir={tmp_path / 'ref_ckpt'}"))
    real_run_epoch = Trainer.run_epoch

    def killed_in_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # as if the process were stopped during epoch 2
        return real_run_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(smoke_config())
    assert len(history(tmp_path / "out")) == 1  # epoch 1 was kept
    assert list((tmp_path / "checkpoints").glob("*.pt"))
    monkeypatch.setattr(Trainer, "run_epoch", real_run_epoch)
    calls = []
    monkeypatch.setattr(Trainer, "run_epoch", lambda self, epoch: calls.append(epoch) or real_run_epoch(self, epoch))
    resumed = run(smoke_config())
    assert calls == [2]  # only the missing epoch ran
    assert {k: v for k, v in resumed.items() if k not in TIMES} == {k: v for k, v in reference.items() if k not in TIMES}
    assert same_weights(weights(tmp_path / "out"), weights(tmp_path / "ref"))
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # removed once the run completed


def test_mlflow_records_params_metrics_artifacts_and_tags(smoke_config, tmp_path: Path, caplog) -> None:
    from mlflow import MlflowClient

    from scpl_kit.environment import cpu_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = smoke_config("method=scpl", "tracking.enabled=true", f"tracking.uri={uri}", "tracking.stage=train@scpl-0")
    with caplog.at_level("INFO", logger="scpl_kit"):
        summary = run(cfg)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("scpl-kit").experiment_id
    (found,) = client.search_runs([experiment])
    data, run_id = found.data, found.info.run_id
    assert found.info.status == "FINISHED" and data.tags["outcome"] == "completed"
    assert data.params["method.temperature"] == "0.1" and data.params["trainer.epochs"] == "2" and data.params["data.name"] == "mnist5k"
    assert data.tags["method"] == "scpl" and data.tags["dataset"] == "mnist5k" and data.tags["model"] == "vgg"
    assert data.tags["engine"] == "sequential" and data.tags["seed"] == "0" and data.tags["dvc_stage"] == "train@scpl-0"
    assert data.tags["config.profile"] == "smoke" and data.tags["config.method"] == "scpl"
    assert len(data.tags["git_commit"]) in (40, len("unknown"))
    # Where the numbers came from: bitwise repeatable only on the same CPU type and thread count.
    assert data.tags["env.cpu"] == cpu_model() and data.tags["env.torch"] == torch.__version__
    assert data.tags["env.torch_threads"] == str(torch.get_num_threads())
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["environment"]["cpu"] == cpu_model()
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "loss/block3/supcon")] == [1, 2]
    # Final metrics have their own names: the per-epoch charts end at the last epoch's real value.
    for name in ("test_acc", "train_time_s", "samples_per_s"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2]
    assert data.metrics["summary/test_acc"] == pytest.approx(summary["test_acc"])
    assert data.metrics["summary/train_time_s"] == pytest.approx(summary["train_time_s"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.json", "history.csv"} <= artifacts
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the database, not in the cwd
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["mlflow_run_id"] == run_id
    assert f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning" in caplog.text


def test_an_interrupted_run_ends_killed(smoke_config, tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    real_run_epoch = Trainer.run_epoch

    def interrupted_in_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # Ctrl-C
        return real_run_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", interrupted_in_epoch_2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(KeyboardInterrupt):
        run(smoke_config("method=bp", "tracking.enabled=true", f"tracking.uri={uri}"))
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])
    assert found.info.status == "KILLED" and found.data.tags["outcome"] == "killed"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val_acc")] == [1]


def test_a_failure_after_training_ends_the_run_failed(smoke_config, tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("scpl_kit.train.write_results", disk_full)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(OSError, match="No space left"):
        run(smoke_config("method=bp", "trainer.epochs=1", "tracking.enabled=true", f"tracking.uri={uri}"))
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])
    assert found.info.status == "FAILED" and found.data.tags["outcome"] == "failed" and "No space" in found.data.tags["error"]


def test_saved_model_is_the_one_whose_accuracy_is_reported(smoke_config, tmp_path: Path, monkeypatch) -> None:
    """model.pt holds the best-validation epoch's weights, not the last epoch's: evaluating it gives
    back the test accuracy that epoch recorded. Epoch 1 is made the best by raising its val_acc."""
    real_run_epoch = Trainer.run_epoch

    def epoch_1_looks_best(self, epoch):
        record = real_run_epoch(self, epoch)
        return {**record, "val_acc": 1.0} if epoch == 1 else record

    monkeypatch.setattr(Trainer, "run_epoch", epoch_1_looks_best)
    summary = run(smoke_config("method=scpl", "trainer.epochs=2"))
    epochs = pd.read_csv(tmp_path / "out" / "history.csv")
    assert summary["best_val_epoch"] == 1 and summary["test_acc"] == epochs.test_acc[0]
    assert torch.load(tmp_path / "out" / "model.pt")["epoch"] == 1
    report = evaluate_run(tmp_path / "out")
    assert report["matches_training"] and report["test_acc"] == pytest.approx(epochs.test_acc[0])
    assert report["saved_weights"] == "epoch 1, the best validation accuracy"


def test_nan_loss_stops_with_block_and_step_and_keeps_what_was_logged(smoke_config, tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    real_forward = SupConHead.forward
    calls = {"n": 0}

    def nan_in_block2_late(self, features, labels):
        loss = real_forward(self, features, labels)
        if features.shape[1] == 2 * 16 and features.shape[-1] == 7:  # block 2's output at width 1/16
            calls["n"] += 1
            if calls["n"] == 30:  # step 30: in epoch 2 (27 steps per epoch at batch 128)
                return loss * float("nan")
        return loss

    monkeypatch.setattr(SupConHead, "forward", nan_in_block2_late)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(NonFiniteLossError, match=r"non-finite block2/supcon loss \(nan\) in block2 at step 30"):
        run(smoke_config("method=scpl", "tracking.enabled=true", f"tracking.uri={uri}"))
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])
    assert found.info.status == "FAILED" and "block2" in found.data.tags["error"]
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val_acc")] == [1]
    assert len(history(tmp_path / "out")) == 1


def test_evaluation_of_saved_weights_matches_training(smoke_config, tmp_path: Path) -> None:
    summary = run(smoke_config("method=scpl"))
    report = evaluate_run(tmp_path / "out")
    assert report["matches_training"] and report["test_acc"] == pytest.approx(summary["test_acc"])
    assert sum(map(sum, report["confusion"])) == 1000


def test_a_run_stops_after_the_first_epoch_reaching_the_target_accuracy(smoke_config, tmp_path: Path) -> None:
    """trainer.stop_at_val_acc: the run ends, complete, after the first epoch at or above it."""
    full = run(smoke_config("out_dir=" + str(tmp_path / "full")))
    first_val_acc = history(tmp_path / "full")[0]["val_acc"]
    stopped = run(smoke_config(f"trainer.stop_at_val_acc={first_val_acc}"))
    assert len(history(tmp_path / "out")) == 1 and stopped["best_val_acc"] == first_val_acc
    assert len(history(tmp_path / "full")) == 2 and full["best_val_acc"] >= first_val_acc


@pytest.mark.slow  # two runs, loader workers and MLflow: ~35 s
def test_loader_workers_train_the_same_weights_and_runs_record_system_metrics(smoke_config, tmp_path: Path) -> None:
    """data.num_workers=2 trains what no workers train (batches carry their seeds); the tracked run has
    MLflow's own system metrics beside its samples/s."""
    from mlflow import MlflowClient

    run(smoke_config("trainer.threads=1", f"out_dir={tmp_path / 'alone'}", f"trainer.checkpoint_dir={tmp_path / 'c0'}"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run(smoke_config("trainer.threads=1", "data.num_workers=2", "tracking.enabled=true", f"tracking.uri={uri}", "tracking.system_metrics_s=0.5"))
    assert same_weights(weights(tmp_path / "out"), weights(tmp_path / "alone"))
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes", "samples_per_s"} <= set(found.data.metrics)
