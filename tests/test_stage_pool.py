"""The pool `make repro` trains on (scpl_kit.stage_pool): stages side by side, each as DVC runs it.
Training stages inside a worker are compared with `dvc repro`'s fresh processes in test_pipeline.py."""

from __future__ import annotations

from pathlib import Path

from scpl_kit.stage_pool import Stage, run_stages


def test_stages_run_side_by_side_with_their_outputs_replaced_and_their_own_logs(tmp_path: Path) -> None:
    (tmp_path / "out_a").mkdir()
    (tmp_path / "out_a" / "stale.txt").write_text("from an older run")  # DVC deletes a stage's outputs first
    # Each stage waits (up to 10 s) until both have started and fails if the other never did: one
    # worker at a time would fail the first stage.
    wait_for_both = "touch started_{0}; for i in $(seq 100); do [ -e started_a ] && [ -e started_b ] && break; sleep 0.1; done; [ -e started_a ] && [ -e started_b ]"
    stages = [
        Stage("train@a", (wait_for_both.format("a"), "mkdir out_a && echo hello from a > out_a/result.txt && echo printed by a"), ("out_a",)),
        Stage("train@b", (wait_for_both.format("b"), "mkdir out_b && echo printed by b"), ("out_b",)),
    ]
    done = run_stages(stages, tmp_path, workers=2, logs=tmp_path / "logs")
    assert {d.name for d in done} == {"train@a", "train@b"} and all(d.ok for d in done)
    assert not (tmp_path / "out_a" / "stale.txt").exists() and (tmp_path / "out_a" / "result.txt").read_text() == "hello from a\n"
    assert "printed by a" in (tmp_path / "logs" / "train-a.log").read_text()
    assert "printed by b" in (tmp_path / "logs" / "train-b.log").read_text()


def test_after_a_failure_no_new_stage_starts_and_the_failure_names_its_last_line(tmp_path: Path) -> None:
    stages = [
        Stage("train@bad", ("echo something went wrong: no data >&2; exit 3",), ()),
        Stage("train@later", ("touch ran_later",), ()),
    ]
    done = run_stages(stages, tmp_path, workers=1, logs=tmp_path / "logs")
    assert [(d.name, d.ok, d.last_line) for d in done] == [("train@bad", False, "something went wrong: no data")]
    assert not (tmp_path / "ran_later").exists()


def test_a_second_command_runs_only_after_the_first_succeeds(tmp_path: Path) -> None:
    (done,) = run_stages([Stage("s", ("false", "touch second"), ())], tmp_path, workers=1, logs=tmp_path / "logs")
    assert not done.ok and not (tmp_path / "second").exists()
