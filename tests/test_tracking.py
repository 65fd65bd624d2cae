"""MLflow records written by several runs at once."""

from pathlib import Path

from sqlalchemy import event

from scpl_kit.tracking import MlflowTracker


def test_two_runs_logging_one_dataset_at_once_both_record_it(tmp_path: Path) -> None:
    """The race the repro pool meets: run B inserts the dataset between run A's lookup and A's insert."""
    from mlflow.store.tracking.dbmodels.models import SqlDataset

    db = tmp_path / "mlflow.db"
    a, b = MlflowTracker(f"sqlite:///{db}", "race"), MlflowTracker(f"sqlite:///{db}", "race")
    a.start("a", {}, {})
    b.start("b", {}, {})

    raced = []

    def other_run_wins(mapper, connection, target) -> None:
        if not raced:  # once: B's own insert, inside this call, must not race again
            raced.append(target.name)
            b.log_dataset("mnist5k", "d1", "data/mnist5k", {})

    event.listen(SqlDataset, "before_insert", other_run_wins)
    try:
        a.log_dataset("mnist5k", "d1", "data/mnist5k", {})
    finally:
        event.remove(SqlDataset, "before_insert", other_run_wins)
    assert raced == ["mnist5k"]
    for tracker in (a, b):
        inputs = tracker.client.get_run(tracker.run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("mnist5k", "d1")]
