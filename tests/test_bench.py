"""The benchmark harness (scpl_kit.bench) against hand-worked values, and the measurement a run
takes of itself (trainer.measure)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO
from scpl_kit import bench
from scpl_kit.engines.measure import StepMeasure, job_stats


def test_median_spread_and_flag() -> None:
    assert bench.median([100.0, 110.0, 90.0]) == 100.0
    assert bench.spread([100.0, 110.0, 90.0]) == pytest.approx(0.2)  # (110 - 90) / 100
    assert bench.flagged([100.0, 110.0, 90.0]) and not bench.flagged([100.0, 105.0, 96.0])  # 20% > 10% > 9%
    assert bench.spread([50.0]) == 0.0 and bench.median([1.0, math.nan, 3.0]) == 2.0  # a failed measurement is left out
    assert math.isnan(bench.spread([])) and math.isnan(bench.median([])) and not bench.flagged([])


def test_rounds_interleave_and_a_failure_costs_only_its_own_row() -> None:
    calls = []

    def measure(config: str, r: int) -> float:
        calls.append((r, config))
        if config == "b" and r == 1:
            raise RuntimeError("worker died\nTraceback ...\nValueError: the real cause")
        return {"a": 10.0, "b": 20.0, "c": 30.0}[config] + r

    heard = []
    outcomes = bench.interleaved(["a", "b", "c"], 3, measure, lambda config, r, result, seconds: heard.append((config, r, result)))
    assert calls == [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c"), (2, "a"), (2, "c")]  # b is not tried again
    assert [(o.config, o.results, o.error) for o in outcomes] == [
        ("a", [10.0, 11.0, 12.0], None), ("b", [], "RuntimeError: ValueError: the real cause"), ("c", [30.0, 31.0, 32.0], None),
    ]
    assert ("b", 0, 20.0) in heard and len(heard) == 7


def test_step_measure_times_the_steps_after_the_profiled_ones_and_takes_their_peak() -> None:
    """CPU: the first step is the warm-up (its 4 MiB are not a step's peak), the next 2 are profiled
    (the larger holds a 1 MiB tensor alive), one settles (a peer may still be reading its profile), the
    rest are timed; samples count only in timed steps; intervals run from one step's end to the next's."""
    measure = StepMeasure(torch.device("cpu"), memory_steps=2)
    sizes = [2**20, 2**18, 2**16, 2**10, 2**10, 2**10, 2**10]  # float32 elements: 4 MiB, 1 MiB, 256 KiB, ...

    def work(n: int) -> dict[str, torch.Tensor]:
        held = torch.ones(n)
        return {"loss": held.sum()}

    for n in sizes:
        measure.step(lambda n=n: work(n), samples=8)
    stats = measure.stats()
    assert len(measure.intervals) == 3 and measure.samples == 24  # steps 5..7 timed, each from the end of the one before
    assert stats["peak_mb"] == pytest.approx(1.0, abs=0.01)
    assert stats["samples_per_s"] == pytest.approx(24 / sum(measure.intervals))
    assert stats["step_s"] == sorted(measure.intervals)[1]
    unmeasured = StepMeasure(torch.device("cpu"), memory_steps=0)
    unmeasured.step(lambda: work(8), samples=8)
    assert math.isnan(unmeasured.stats()["peak_mb"])  # no profiled step: no memory figure, not 0
    warmed_only = StepMeasure(torch.device("cpu"), memory_steps=2)
    warmed_only.step(lambda: work(2**20), samples=8)  # an epoch of one step: the profiled warm-up only
    assert math.isnan(warmed_only.stats()["peak_mb"]) and warmed_only.unit_peaks_mb == {}  # not the warm-up's 4 MiB


def test_each_units_peak_is_told_apart_and_matches_the_unit_measured_alone() -> None:
    """The profiler ranges train_step puts around each unit: a sequential step of SCPL's 4 VGG modules
    profiled once gives each module the peak `unit_peak_memory` measures by training it alone (two
    independent computations), and the largest of them is at most the whole step's peak."""
    from scpl_kit.memory import unit_peak_memory
    from scpl_kit.methods import build_units
    from scpl_kit.models import build_model
    from scpl_kit.updater import train_step, updaters_for

    def units() -> list:
        torch.manual_seed(0)
        return build_units("scpl", build_model("vgg", (3, 32, 32), 10, width=0.125), 10, pool=True)

    example = {"features": torch.randn(32, 3, 32, 32), "labels": torch.arange(32) % 10}
    alone = unit_peak_memory(units(), example)
    together = units()
    updaters = updaters_for(together)
    measure = StepMeasure(torch.device("cpu"), memory_steps=1)

    def step() -> dict[str, torch.Tensor]:
        signal = example
        for unit, updater in zip(together, updaters):
            signal, _ = train_step(unit, updater, signal)
        return {}

    for _ in range(2):  # the warm-up, then the profiled step
        measure.step(step, samples=32)
    stats = measure.stats()
    peaks = [stats[f"unit/{unit.name}"] for unit in together]
    # Within 1%: the same allocations and frees in the same order (both sessions profile the step before
    # the measured one, so what it leaves is freed at its size, whatever ran before in this process).
    assert peaks == pytest.approx(alone, rel=0.01)
    assert max(peaks) <= stats["peak_mb"] + 1e-6 and len(set(peaks)) == len(peaks)


def test_job_stats_keep_the_slowest_pace_and_the_largest_peak() -> None:
    per_process = [{"samples_per_s": 100.0, "peak_mb": 5.0, "step_s": 0.1}, {"samples_per_s": 80.0, "peak_mb": 7.0, "step_s": 0.2}]
    assert job_stats(per_process) == {
        "time/samples_per_s": 80.0, "memory/peak_mb": 7.0, "time/step_s": 0.2,
        "time/rank0/samples_per_s": 100.0, "memory/rank0/peak_mb": 5.0, "time/rank1/samples_per_s": 80.0, "memory/rank1/peak_mb": 7.0,
    }
    assert job_stats(per_process[:1]) == {"time/samples_per_s": 100.0, "memory/peak_mb": 5.0, "time/step_s": 0.1}


def test_a_measured_run_records_its_pace_and_memory_every_epoch(smoke_config, tmp_path: Path) -> None:
    """trainer.measure=true: every epoch's record has the steady samples/s and the peak memory, and the
    weights are those of the same run unmeasured (measurement changes no number it trains on)."""
    from scpl_kit.train import run
    from test_training import history, same_weights, weights

    measured = smoke_config("method=scpl", "trainer.measure=true", f"out_dir={tmp_path / 'measured'}", f"trainer.checkpoint_dir={tmp_path / 'c1'}")
    plain = smoke_config("method=scpl", f"out_dir={tmp_path / 'plain'}", f"trainer.checkpoint_dir={tmp_path / 'c2'}")
    run(measured)
    run(plain)
    records = pd.read_csv(tmp_path / "measured" / "history.csv")
    assert (records["time/samples_per_s"] > 0).all() and (records["memory/peak_mb"] > 0).all() and (records["time/step_s"] > 0).all()
    assert history(tmp_path / "measured") == history(tmp_path / "plain")
    assert same_weights(weights(tmp_path / "measured"), weights(tmp_path / "plain"))


@pytest.mark.slow
def test_throughput_bench_end_to_end_at_a_tiny_size(tmp_path: Path, synthetic_processed_dir: Path) -> None:
    """Four rows of bench/throughput.py, one round, batches of 16 (~30 s on 2 cores): each row a run
    through the config path, its own measurements in the table, the bubble model's idle share worked
    out by hand, SCPL's pipeline set against the best BP schedule, the targets and the figure."""
    rows = ["vgg_bp1", "vgg_bp1_ckpt", "vgg_1f1b", "transformer_zero_bubble", "vgg_scpl_pipeline"]
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/throughput.py"), "--out", str(tmp_path), "--rounds", "1", "--rows", *rows,
         "--set", "trainer.batch_size=16", "trainer.steps_per_epoch=8", f"data.processed_dir={synthetic_processed_dir}", "tracking.enabled=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = pd.read_csv(tmp_path / "tables/throughput.csv").set_index("row")
    assert list(table.index) == rows and (table.samples_per_s > 0).all() and (table.peak_mem_mb > 0).all()
    assert table.loc["vgg_1f1b", "bubble_idle"] == pytest.approx(1 / 5)  # (K - 1) / (M + K - 1), K = 2, M = 4
    assert table.loc["transformer_zero_bubble", "bubble_idle"] == 0.0
    assert table.loc["vgg_1f1b", "ideal_speedup"] > 0 and table.loc["vgg_scpl_pipeline", "ideal_speedup"] > 1
    ratio = table.loc["vgg_scpl_pipeline", "samples_per_s"] / table.loc["vgg_1f1b", "samples_per_s"]
    assert table.loc["vgg_scpl_pipeline", "vs_best_bp"] == pytest.approx(ratio, abs=6e-4)  # the csv keeps 3 decimals
    assert table.loc["vgg_bp1_ckpt", "peak_mem_mb"] < table.loc["vgg_bp1", "peak_mem_mb"]  # checkpointing keeps fewer activations
    md = (tmp_path / "tables/throughput.md").read_text()
    assert "## Targets" in md and "vgg: SCPL pipeline ≥ 1.15× the best BP schedule" in md and "transformer: SCPL pipeline" in md
    assert "- vgg_scpl_pipeline: stages [0: " in md and "units block1 " in md  # the profile: the split, its step times, each unit's peak
    assert (tmp_path / "figures/throughput.png").read_bytes()[:4] == b"\x89PNG"
