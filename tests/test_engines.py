"""Every engine trains to the same weights and metrics as the sequential engine, same seed, on the CPU."""

import json
import os
import time
import traceback
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig

from scpl_kit.engines.balance import balanced_stages, even_stages, unit_step_times
from scpl_kit.engines.gpipe import block_step_times
from scpl_kit.engines.launch import free_port, set_rank_env
from scpl_kit.engines.pipeline import PipelineEngine
from scpl_kit.methods import build_units
from scpl_kit.models import build_model
from scpl_kit.train import run

from conftest import sequential_run
from test_training import history, same_weights, weights


def _rank_main(rank: int, world: int, port: int, result_dir: str, cfg: DictConfig, fault_rank: int, fault: str) -> None:
    """One torchrun-like process: the env vars torchrun would set, then the normal training entry.
    `fault_rank` joins the group and then crashes without a word, or gets stuck (alive, silent)."""
    set_rank_env(rank, world, port)
    try:
        if rank == fault_rank:
            from scpl_kit.engines import build_engine
            from scpl_kit.train import options

            build_engine(cfg.engine.name, **options(cfg.engine))  # joins the job as the configured engine
            if fault == "stuck":
                time.sleep(4 * cfg.engine.timeout_s)
            os._exit(3)
        run(cfg)
        Path(result_dir, f"rank{rank}.ok").write_text("ok")
    except BaseException as error:
        Path(result_dir, f"rank{rank}.err").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise


def run_ranks(cfg: DictConfig, world: int, tmp: Path, fault_rank: int = -1, fault: str = "crash") -> dict[str, str]:
    """Start `world` processes as torchrun would, wait for all (never more than 3 minutes), and
    return what each rank reported: `rank<k>.ok`, or `rank<k>.err` with its error."""
    return spawn_ranks(_rank_main, world, tmp, cfg, fault_rank, fault)


def spawn_ranks(main, world: int, tmp: Path, *args) -> dict[str, str]:
    """`main(rank, world, port, result_dir, *args)` in `world` processes; the files they left in result_dir."""
    results = tmp / "ranks"
    results.mkdir(exist_ok=True)
    context = mp.start_processes(main, args=(world, free_port(), str(results), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + 180
    while any(p.is_alive() for p in context.processes) and time.time() < deadline:
        time.sleep(0.5)
    hung = [p for p in context.processes if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    return {p.name: p.read_text() for p in results.iterdir()}


def reference(smoke_config, tmp_path: Path, method: str = "scpl") -> Path:
    return sequential_run(smoke_config, tmp_path / "sequential", f"method={method}")


def assert_same_run(a: Path, b: Path) -> None:
    assert history(a) == history(b)
    assert same_weights(weights(a), weights(b))


def test_stage_splits() -> None:
    assert even_stages(4, 2) == [[0, 1], [2, 3]] and even_stages(5, 2) == [[0, 1, 2], [3, 4]] and even_stages(4, 4) == [[0], [1], [2], [3]]
    assert balanced_stages([4.0, 1.0, 1.0, 1.0], 2) == [[0], [1, 2, 3]]
    assert balanced_stages([1.0, 1.0, 1.0, 3.0], 2) == [[0, 1, 2], [3]]
    assert balanced_stages([2.0, 2.0, 2.0, 2.0], 4) == [[0], [1], [2], [3]]


# VGG blocks of which the first costs far more than the three others together (about 20× on a CPU):
# a split by time puts it alone on a stage, where the even split by count pairs it with block 2.
HEAVY_FIRST = [[48, 48, 48, 48, "M"], [2], [2], [2]]


def heavy_first(method: str):
    torch.manual_seed(0)
    model = build_model("vgg", (1, 16, 16), 4, blocks=HEAVY_FIRST, predictor_hidden=16)
    return model, build_units(method, model, 4, **({"hidden": 16} if method == "early_exit" else {}))


@pytest.mark.parametrize("method", ["early_exit", "bp"])
def test_step_times_find_the_heavy_block_and_leave_the_run_untouched(method: str) -> None:
    """One time per unit (pipeline) or per block (gpipe), all positive, the heavy block alone on a
    stage; the units' weights and the random stream are as before (it times copies)."""
    model, units = heavy_first(method)
    before, rng = [{k: v.clone() for k, v in unit.state_dict().items()} for unit in units], torch.get_rng_state()
    example = model.example_batch(32, 4)
    times = unit_step_times(units, example, torch.device("cpu"))
    assert len(times) == len(units) and all(t > 0 for t in times)
    if method == "bp":
        times = block_step_times(units[0].network(), example, torch.device("cpu"), microbatches=2)
    assert len(times) == 4 and all(t > 0 for t in times)
    assert balanced_stages(times, 2) == [[0], [1, 2, 3]] != even_stages(4, 2)
    assert torch.equal(rng, torch.get_rng_state())
    for unit, state in zip(units, before):
        assert all(torch.equal(value, state[key]) for key, value in unit.state_dict().items())


def _stages_main(rank: int, world: int, port: int, result_dir: str) -> None:
    """Each way of choosing stages, on every rank: what each rank got."""
    from scpl_kit.engines.gpipe import GPipeEngine

    set_rank_env(rank, world, port)
    cases = {  # engine, method, options, whether setup gets an example batch
        "time": (PipelineEngine, "early_exit", {}, True),
        "count": (PipelineEngine, "early_exit", {"balance": "count"}, True),
        "given": (PipelineEngine, "early_exit", {"stages": [[0, 1, 2], [3]]}, True),
        "no example": (PipelineEngine, "early_exit", {}, False),
        "gpipe time": (GPipeEngine, "bp", {}, True),
        "gpipe count": (GPipeEngine, "bp", {"balance": "count"}, True),
    }
    try:
        found = {}
        for name, (engine_class, method, options, with_example) in cases.items():
            model, units = heavy_first(method)
            engine = engine_class(timeout_s=60, **options)
            engine.setup(units, model.example_batch(32, 4) if with_example else None)
            found[name] = engine.stages
        # Rank 0 hosts the rendezvous store: it must not close while another rank still creates a group
        # (an engine's one-rank stage groups let rank 0 run ahead).
        torch.distributed.barrier()
        engine.close()
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(found))
    except BaseException as error:
        Path(result_dir, f"rank{rank}.err").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise


def test_stages_by_time_by_default_by_count_on_request(tmp_path: Path) -> None:
    """balance: time (the default) puts the heavy first block alone, and every rank gets rank 0's
    split; balance: count is the even split; given stages are kept; without an example batch there
    is nothing to time: the even split. The gpipe engine splits the BP network's blocks the same way."""
    reports = spawn_ranks(_stages_main, 2, tmp_path)
    assert sorted(reports) == ["rank0.json", "rank1.json"], reports
    assert reports["rank0.json"] == reports["rank1.json"]
    assert json.loads(reports["rank0.json"]) == {
        "time": [[0], [1, 2, 3]], "count": [[0, 1], [2, 3]], "given": [[0, 1, 2], [3]], "no example": [[0, 1], [2, 3]],
        "gpipe time": [[0], [1, 2, 3]], "gpipe count": [[0, 1], [2, 3]],
    }


def test_bp_schedules_place_stages_and_idle_as_the_bubble_model_says() -> None:
    """Looped stages (rank r: r, r+K) and the V (rank r: r, 2K−1−r), as torch's schedules place them;
    the bubble model's idle share (K−1)/(vM+K−1), and none for the zero-bubble schedules."""
    from scpl_kit.engines.gpipe import idle_share, stage_owner

    assert [stage_owner(s, 2, "loop") for s in range(4)] == [0, 1, 0, 1]
    assert [stage_owner(s, 3, "v") for s in range(6)] == [0, 1, 2, 2, 1, 0]
    assert idle_share("gpipe", 2, 4) == idle_share("1f1b", 2, 4) == 1 / 5
    assert idle_share("gpipe", 4, 1) == 3 / 4  # naive model parallelism: one process works at a time
    assert idle_share("interleaved_1f1b", 2, 4) == 1 / 9
    assert idle_share("zero_bubble", 2, 4) == idle_share("zbv", 2, 4) == 0.0


def test_an_unknown_balance_is_refused() -> None:
    with pytest.raises(ValueError, match="engine.balance='fast'; valid: time, count"):
        PipelineEngine(balance="fast")


DECOUPLED = ["scpl", "early_exit", "al"]


@pytest.mark.parametrize("method", DECOUPLED)
def test_threads_engine_matches_sequential(smoke_config, tmp_path: Path, method: str) -> None:
    expected = reference(smoke_config, tmp_path, method)
    run(smoke_config(f"method={method}", "trainer.threads=1", "engine=threads", "engine.devices=[cpu,cpu]", f"out_dir={tmp_path / 'threads'}"))
    assert_same_run(expected, tmp_path / "threads")


@pytest.mark.slow
@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("method", DECOUPLED)
def test_pipeline_engine_matches_sequential(smoke_config, tmp_path: Path, method: str, stages: int) -> None:
    """Same weights and the same history, per-exit accuracies included: AL's inference runs forward
    through every stage and back again through each block's inverse."""
    expected = reference(smoke_config, tmp_path, method)
    cfg = smoke_config(f"method={method}", "trainer.threads=1", "engine=pipeline", "engine.timeout_s=120", f"out_dir={tmp_path / 'pipeline'}")
    reports = run_ranks(cfg, stages, tmp_path)
    assert sorted(reports) == [f"rank{r}.ok" for r in range(stages)], reports
    assert_same_run(expected, tmp_path / "pipeline")
    if method != "scpl":  # Early Exit and AL read out every block
        assert {f"test_acc/block{k}" for k in range(1, 5)} <= set(pd.read_csv(tmp_path / "pipeline" / "history.csv").columns)


@pytest.mark.slow
def test_pipeline_with_uneven_stages_and_tracking(smoke_config, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    expected = reference(smoke_config, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = smoke_config(
        "method=scpl", "trainer.threads=1", "engine=pipeline", "engine.stages=[[0,1,2],[3]]", "engine.timeout_s=120",
        f"out_dir={tmp_path / 'pipeline'}", "tracking.enabled=true", f"tracking.uri={uri}",
    )
    reports = run_ranks(cfg, 2, tmp_path)
    assert sorted(reports) == ["rank0.ok", "rank1.ok"], reports
    assert_same_run(expected, tmp_path / "pipeline")
    client = MlflowClient(uri)
    (only,) = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])  # one rank logs
    assert only.data.tags["engine"] == "pipeline" and len(client.get_metric_history(only.info.run_id, "loss/block4/supcon")) == 2


def test_bp_under_pipeline_points_to_gpipe(smoke_config, tmp_path: Path) -> None:
    reports = run_ranks(smoke_config("method=bp", "engine=pipeline", "engine.timeout_s=30"), 2, tmp_path)
    assert sorted(reports) == ["rank0.err", "rank1.err"]
    assert all("engine=gpipe" in text for text in reports.values())


@pytest.mark.slow  # processes that time out a stuck peer or train every method: 20-60 s
@pytest.mark.parametrize(("engine", "fault"), [("pipeline", "crash"), ("pipeline", "stuck"), ("ddp", "crash"), ("ddp", "stuck")])
def test_a_crashed_or_stuck_rank_stops_the_job_with_a_one_line_reason(smoke_config, tmp_path: Path, engine: str, fault: str) -> None:
    """Not a hang and not a raw gloo traceback: the rank that waited says another rank stopped
    answering, and the CLI prints that in one line (PeerError is a user-facing error)."""
    from scpl_kit.engines.base import PeerError
    from scpl_kit.train import USER_ERRORS

    cfg = smoke_config("method=scpl", f"engine={engine}", "engine.timeout_s=5")
    started = time.time()
    reports = run_ranks(cfg, 2, tmp_path, fault_rank=1, fault=fault)
    assert "rank0.err" in reports and "rank0.ok" not in reports
    assert reports["rank0.err"].startswith("PeerError: rank 0: another rank stopped answering"), reports["rank0.err"]
    assert time.time() - started < 60 and issubclass(PeerError, USER_ERRORS)


def bp_with_gradient_accumulation(cfg: DictConfig, microbatches: int) -> list[dict]:
    """The reference GPipe must match, computed independently: plain BP on one process, each batch's
    gradient accumulated over `microbatches` chunks of mean loss / microbatches. Images come as
    (inputs, labels); text batches as named tensors (token ids, lengths, labels)."""
    from scpl_kit.data.augment import Augmentation
    from scpl_kit.train import build, load_data, update_recipe
    from scpl_kit.trainer import configure_torch, epoch_seed

    configure_torch(cfg.trainer.threads, cfg.trainer.deterministic)
    data = load_data(cfg)
    model, (unit,) = build(cfg, data)
    updater = update_recipe(cfg, data).updater(unit)  # the run's Adam and schedule; the steps are taken here
    for epoch in range(1, cfg.trainer.epochs + 1):
        torch.manual_seed(epoch_seed(cfg.seed, epoch))
        shuffle = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
        model.train()
        for batch in data.loader("train", cfg.trainer.batch_size, True, Augmentation("none", 28, False), shuffle, drop_last=True):
            batch = dict(batch) if isinstance(batch, dict) else {"features": batch[0], "labels": batch[1]}
            labels = batch.pop("labels")
            chunks = [dict(zip(batch, parts)) for parts in zip(*(t.tensor_split(microbatches) for t in batch.values()))]
            updater.optimizer.zero_grad()
            for inputs, ys in zip(chunks, labels.tensor_split(microbatches)):
                (torch.nn.functional.cross_entropy(model(inputs)["features"], ys) / microbatches).backward()
            updater.optimizer.step()
            updater.scheduler.step()
    return [unit.state_dict()]


SCHEDULE_CASES = {  # engine.schedule, method.checkpoint, stages of the tiny VGG's 4 blocks
    "1f1b": ("1f1b", False, [[0, 1], [2, 3]]),
    "interleaved_1f1b": ("interleaved_1f1b", False, [[0], [1], [2], [3]]),
    "zero_bubble": ("zero_bubble", False, [[0], [1], [2], [3]]),
    "zbv": ("zbv", False, [[0], [1], [2], [3]]),
    "1f1b_checkpoint": ("1f1b", True, [[0, 1], [2, 3]]),
}


def tiny_bp(checkpoint: bool):
    """BP on a tiny VGG without BatchNorm (per-micro-batch statistics are GPipe's known difference), in float64."""
    torch.manual_seed(0)
    model = build_model("vgg", (1, 16, 16), 4, width=0.125, predictor_hidden=16, batchnorm=False)
    return build_units("bp", model, 4, checkpoint=checkpoint)


def tiny_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 16, 16, generator=generator, dtype=torch.float64), torch.randint(0, 4, (16,), generator=generator)) for _ in range(3)]


def _schedules_main(rank: int, world: int, port: int, result_dir: str) -> None:
    """Each schedule in turn on these 2 processes: the weights after 3 batches, on rank 0."""
    from scpl_kit.engines.gpipe import GPipeEngine
    from scpl_kit.updater import OptimizerSettings, UpdateRecipe

    set_rank_env(rank, world, port)
    torch.set_default_dtype(torch.float64)
    try:
        found = {}
        for name, (schedule, checkpoint, stages) in SCHEDULE_CASES.items():
            engine = GPipeEngine(microbatches=4, schedule=schedule, stages=stages, timeout_s=60)
            engine.setup(tiny_bp(checkpoint), recipe=UpdateRecipe(OptimizerSettings(lr=3e-3), steps_per_epoch=3, epochs=1))
            engine.train_epoch(tiny_batches())
            found[name] = engine.training_state()
        torch.distributed.barrier()
        engine.close()
        if rank == 0:
            torch.save(found, Path(result_dir).parent / "schedules.pt")
        Path(result_dir, f"rank{rank}.ok").write_text("ok")
    except BaseException as error:
        Path(result_dir, f"rank{rank}.err").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise


@pytest.mark.slow  # two processes, five schedules: ~15 s
def test_every_bp_schedule_and_checkpointing_end_with_plain_bps_weights(tmp_path: Path) -> None:
    """1F1B, interleaved 1F1B, zero-bubble and ZBV (the last three with 2 stages per process), and 1F1B
    with activation checkpointing, on 2 processes with 4 micro-batches: after 3 batches, the weights
    plain BP gets on one process from the whole batches (float64)."""
    from scpl_kit.engines.sequential import SequentialEngine
    from scpl_kit.updater import OptimizerSettings, UpdateRecipe

    reports = spawn_ranks(_schedules_main, 2, tmp_path)
    assert sorted(reports) == ["rank0.ok", "rank1.ok"], reports
    found = torch.load(tmp_path / "schedules.pt")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        engine = SequentialEngine("cpu")
        engine.setup(tiny_bp(False), recipe=UpdateRecipe(OptimizerSettings(lr=3e-3), steps_per_epoch=3, epochs=1))
        engine.train_epoch(tiny_batches())
        (expected,) = [unit.state_dict() for unit in engine.units]
    finally:
        torch.set_default_dtype(default)
    assert found.keys() == SCHEDULE_CASES.keys()
    for name, states in found.items():
        (state,) = states  # the one unit, merged from both processes' stages
        assert state["module"].keys() == expected.keys(), name
        for key, value in expected.items():
            torch.testing.assert_close(state["module"][key], value, rtol=1e-9, atol=1e-10, msg=f"{name}: {key}")


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [1, 4])
def test_gpipe_matches_bp_with_gradient_accumulation(smoke_config, tmp_path: Path, microbatches: int) -> None:
    cfg = smoke_config(
        "method=bp", "model.batchnorm=false", "trainer.threads=1", "trainer.epochs=1", "engine=gpipe",
        f"engine.microbatches={microbatches}", "engine.timeout_s=120", f"out_dir={tmp_path / 'gpipe'}",
    )
    reports = run_ranks(cfg, 2, tmp_path)
    assert sorted(reports) == ["rank0.ok", "rank1.ok"], reports
    expected = bp_with_gradient_accumulation(cfg, microbatches)
    got = weights(tmp_path / "gpipe")
    for key, value in expected[0].items():
        torch.testing.assert_close(got[0][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_gpipe_matches_bp_on_a_text_model(text_smoke_config, tmp_path: Path) -> None:
    """Token ids and their lengths travel through PyTorch's pipeline schedule together; each batch is
    padded to the full length there (the schedule keeps the first batch's shapes), which the LSTM's
    packing makes exact."""
    cfg = text_smoke_config(
        "model=lstm", "method=bp", "trainer.threads=1", "trainer.epochs=1", "engine=gpipe", "engine.microbatches=4",
        "engine.timeout_s=120", f"out_dir={tmp_path / 'gpipe'}",
    )
    reports = run_ranks(cfg, 2, tmp_path)
    assert sorted(reports) == ["rank0.ok", "rank1.ok"], reports
    expected = bp_with_gradient_accumulation(cfg, 4)
    got = weights(tmp_path / "gpipe")
    for key, value in expected[0].items():
        torch.testing.assert_close(got[0][key], value, rtol=1e-5, atol=1e-6, msg=key)


# Dropout draws from the process's random stream, which units on other threads or processes consume in
# another order: with dropout, engines agree in distribution only. The equivalence checks turn it off.
TEXT_MODELS = {"transformer": ("model=transformer", "model.dropout=0.0"), "lstm": ("model=lstm",)}


def text_reference(text_smoke_config, tmp_path: Path, *overrides: str) -> Path:
    return sequential_run(text_smoke_config, tmp_path / "sequential", *overrides)


@pytest.mark.parametrize(("model", "method"), [("transformer", "scpl"), ("transformer", "al"), ("lstm", "early_exit")])
def test_threads_engine_matches_sequential_on_text(text_smoke_config, tmp_path: Path, model: str, method: str) -> None:
    """A text batch's lengths travel with its features from unit to unit (and thread to thread)."""
    expected = text_reference(text_smoke_config, tmp_path, *TEXT_MODELS[model], f"method={method}")
    run(text_smoke_config(*TEXT_MODELS[model], f"method={method}", "trainer.threads=1", "engine=threads", "engine.devices=[cpu,cpu]",
                          f"out_dir={tmp_path / 'threads'}"))
    assert_same_run(expected, tmp_path / "threads")


@pytest.mark.slow
@pytest.mark.parametrize(("model", "method"), [("transformer", "scpl"), ("lstm", "al")])
def test_pipeline_engine_matches_sequential_on_text(text_smoke_config, tmp_path: Path, model: str, method: str) -> None:
    """Across processes too: every batch's lengths are sent with its features (batches differ in length)."""
    expected = text_reference(text_smoke_config, tmp_path, *TEXT_MODELS[model], f"method={method}")
    cfg = text_smoke_config(*TEXT_MODELS[model], f"method={method}", "trainer.threads=1", "engine=pipeline", "engine.timeout_s=120",
                            f"out_dir={tmp_path / 'pipeline'}")
    reports = run_ranks(cfg, 2, tmp_path)
    assert sorted(reports) == ["rank0.ok", "rank1.ok"], reports
    assert_same_run(expected, tmp_path / "pipeline")


def test_decoupled_method_under_gpipe_points_to_pipeline(smoke_config, tmp_path: Path) -> None:
    reports = run_ranks(smoke_config("method=scpl", "engine=gpipe", "engine.timeout_s=30"), 2, tmp_path)
    assert sorted(reports) == ["rank0.err", "rank1.err"]
    assert all("engine=pipeline" in text for text in reports.values())


@pytest.mark.slow
def test_under_torchrun_one_rank_speaks_for_the_job(processed_dir: Path, tmp_path: Path) -> None:
    """The per-epoch log and the final JSON come once, from rank 0, not once per stage."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         "-m", "scpl_kit.train", "profile=smoke", "method=scpl", "engine=pipeline", "trainer.epochs=1", "trainer.threads=1",
         "trainer.progress=false", "tracking.enabled=false", f"data.processed_dir={processed_dir}", f"out_dir={tmp_path / 'out'}",
         f"trainer.checkpoint_dir={tmp_path / 'ckpt'}"],
        capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("epoch 1/1") == 1, done.stderr
    assert done.stderr.count("set engine.stages to override") == 1, done.stderr  # stages balanced by time, by default
    assert done.stdout.count('"best_val_acc"') == 1, done.stdout


@pytest.mark.slow
def test_a_method_engine_pair_starts_its_own_torchrun(processed_dir: Path, tmp_path: Path) -> None:
    """method=bp_gpipe (engine.processes=2) from a plain `python -m scpl_kit.train`, as the DVC train
    stage runs it: two processes, one result, and the table's engine label says how it ran."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "scpl_kit.train", "profile=smoke", "method=bp_gpipe", "trainer.epochs=1", "trainer.progress=false",
         "tracking.enabled=false", f"data.processed_dir={processed_dir}", f"out_dir={tmp_path / 'out'}", f"trainer.checkpoint_dir={tmp_path / 'ckpt'}"],
        capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["method"], metrics["engine"], metrics["method_config"], metrics["engine_detail"]) == ("bp", "gpipe", "bp_gpipe", "gpipe K=2 M=4")
    assert done.stdout.count('"best_val_acc"') == 1


def test_an_engine_cuts_whole_batches_itself_and_takes_a_loader_made_for_its_share_as_it_is(processed_dir: Path) -> None:
    from scpl_kit.data.datasets import load_prepared
    from scpl_kit.data.share import Share
    from scpl_kit.engines.replicas import read_share

    data = load_prepared("mnist5k", processed_dir)
    second = Share(1, 2)
    cut = [(signal, samples) for signal, samples in read_share(data.loader("val", 100), second)]
    delivered = [(signal, samples) for signal, samples in read_share(data.loader("val", 100, share=second), second)]
    assert len(cut) == len(delivered) == 5 and all(samples == 100 for _, samples in cut + delivered)
    for (a, _), (b, _) in zip(cut, delivered):
        assert len(b["labels"]) == 50 and all(torch.equal(a[k], b[k]) for k in ("features", "labels"))
    with pytest.raises(ValueError, match="read for"):
        next(read_share(data.loader("val", 100, share=Share(0, 2)), second))
    whole = list(data.loader("val", 100))
    assert len(list(read_share(iter(whole), second))) == 5  # any iterable of whole batches, without a length too
    every_other = Share(owned=lambda: iter([True, False] * 3))  # an async worker's batches: the others come as None
    kept = list(read_share(whole, every_other))
    assert [signal is None for signal, _ in kept] == [False, True, False, True, False]
    assert all(torch.equal(kept[i][0]["features"], whole[i][0]) for i in (0, 2, 4))
