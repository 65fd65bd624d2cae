"""Training end to end in-process on real MNIST-5k at smoke scale (seconds per run)."""

import json
from pathlib import Path

import pytest
import torch

from scpl_kit.evaluate import evaluate_run
from scpl_kit.methods import NonFiniteLossError
from scpl_kit.methods.heads import SupConHead
from scpl_kit.train import run
from scpl_kit.trainer import Trainer

TIMES = ("train_time_s", "epoch_time_s", "samples_per_s")


def history(out: Path) -> list[dict]:
    import pandas as pd

    return pd.read_csv(out / "history.csv").drop(columns=list(TIMES)).to_dict("records")


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


def test_mlflow_records_params_metrics_artifacts_and_tags(smoke_config, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = smoke_config("method=scpl", "tracking.enabled=true", f"tracking.uri={uri}", "tracking.stage=train@scpl-0")
    summary = run(cfg)
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])
    data = found.data
    assert found.info.status == "FINISHED"
    assert data.params["method.temperature"] == "0.1" and data.params["trainer.epochs"] == "2" and data.params["data.name"] == "mnist5k"
    assert data.tags["method"] == "scpl" and data.tags["dataset"] == "mnist5k" and data.tags["model"] == "vgg"
    assert data.tags["engine"] == "sequential" and data.tags["seed"] == "0" and data.tags["dvc_stage"] == "train@scpl-0"
    assert len(data.tags["git_commit"]) in (40, len("unknown"))
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val_acc")] == [1, 2]
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss/block3/supcon")] == [1, 2]
    assert data.metrics["test_acc"] == pytest.approx(summary["test_acc"])
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"config.yaml", "metrics.json", "history.csv"} <= artifacts
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the database, not in the cwd


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
    assert report["matches_training"] and report["test_acc"] == pytest.approx(summary["final_test_acc"])
    assert sum(map(sum, report["confusion"])) == 1000
