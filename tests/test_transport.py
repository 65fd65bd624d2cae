"""Every engine's traffic, as its transport counts it, against the tensor sizes worked out by hand:
what each process sends per training step, summed over the job (`comm/..._bytes_per_step`)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from scpl_kit.engines import ENGINES, build_engine
from scpl_kit.methods import build_units
from scpl_kit.models import build_model
from scpl_kit.updater import OptimizerSettings, UpdateRecipe

from test_data_parallel import reporting_errors
from test_engines import spawn_ranks
from test_methods import tiny_batch

BATCHES, BATCH = 3, 16
INTRA, INTER = "comm/intra_node_bytes_per_step", "comm/inter_node_bytes_per_step"


def model_and_units(method: str):
    """A tiny VGG without BatchNorm (DDP would broadcast its statistics too), the same in every process."""
    torch.manual_seed(0)
    model = build_model("vgg", (1, 16, 16), 4, width=0.125, predictor_hidden=16, batchnorm=False)
    return model, build_units(method, model, 4, **({"hidden": 16} if method == "early_exit" else {}))


def train_one_epoch(name: str, method: str, **options) -> dict:
    """One epoch of BATCHES batches under engine `name`; its stats and the sizes a test works out from."""
    model, units = model_and_units(method)
    engine = build_engine(name, **({"timeout_s": 60} if ENGINES.get(name).multiprocess else {}), **options)
    x, y = tiny_batch(BATCHES * BATCH)
    engine.setup(units, model.example_batch(BATCH, 4), UpdateRecipe(OptimizerSettings(), steps_per_epoch=BATCHES, epochs=1))
    engine.train_epoch([(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]) for i in range(BATCHES)])
    stats = engine.epoch_stats()
    return {
        "stats": {key: value for key, value in stats.items() if not key.startswith("plan/")},  # what a pipeline's split promised: not traffic
        "param_bytes": sum(p.numel() * 4 for unit in units for p in unit.parameters()),
        "state_bytes": sum(t.numel() * t.element_size() for unit in units for t in unit.state_dict().values()),
        "block_shapes": model.block_output_shapes(),
        "engine": engine,
    }


def test_one_process_engines_send_nothing() -> None:
    for name, options in (("sequential", {}), ("threads", {"devices": ["cpu", "cpu"]})):
        stats = train_one_epoch(name, "scpl", **options)["stats"]
        assert stats == {INTRA: 0.0, INTER: 0.0}, name


def _engines_on_ranks(rank: int, result_dir: str, cases: dict) -> None:
    found = {}
    for case, (name, method, options) in cases.items():
        result = train_one_epoch(name, method, **options)
        engine = result.pop("engine")
        found[case] = {**result, "async_steps": {k: v for k, v in result["stats"].items() if k.endswith("/steps")}}
        torch.distributed.barrier()
    torch.distributed.barrier()
    engine.close()
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(found))


def ranks_report(tmp_path: Path, world: int, cases: dict) -> dict:
    reports = spawn_ranks(reporting_errors(_engines_on_ranks), world, tmp_path, cases)
    assert sorted(reports) == [f"rank{r}.json" for r in range(world)], reports
    found = [json.loads(reports[f"rank{r}.json"]) for r in range(world)]
    for case in cases:  # the job's totals: every rank reports the same
        assert all({k: v for k, v in f[case]["stats"].items() if k.startswith("comm/")} == {k: v for k, v in found[0][case]["stats"].items() if k.startswith("comm/")} for f in found), case
    return found[0]


def test_ddp_on_one_process_sends_nothing(tmp_path: Path) -> None:
    """A process group of one: DDP's all-reduce has no one to send to (it used to report every gradient)."""
    found = ranks_report(tmp_path, 1, {"ddp": ("ddp", "bp", {})})
    assert found["ddp"]["stats"] == {INTRA: 0.0, INTER: 0.0}


@pytest.mark.slow  # two processes training five engines: ~30 s
def test_each_engine_counts_what_it_sends(tmp_path: Path) -> None:
    cases = {
        "ddp": ("ddp", "bp", {}),
        "ddp_2_nodes": ("ddp", "bp", {"ranks_per_node": 1}),
        "pipeline": ("pipeline", "early_exit", {"stages": [[0, 1], [2, 3]]}),
        "gpipe": ("gpipe", "bp", {"stages": [[0, 1], [2, 3]], "microbatches": 2}),
        "async_sgd": ("async_sgd", "bp", {}),
    }
    found = ranks_report(tmp_path, 2, cases)
    float32, int64 = 4, 8

    # DDP: each of the 2 ranks puts every gradient into the all-reduce, every step; one machine: within it.
    ddp = found["ddp"]
    assert ddp["stats"] == {INTRA: 2 * ddp["param_bytes"], INTER: 0.0}
    # Two one-rank nodes: the same bytes, across nodes.
    assert found["ddp_2_nodes"]["stats"] == {INTRA: 0.0, INTER: 2 * ddp["param_bytes"]}

    # Pipeline: stage 0 sends block 2's output and the labels each step, after a header: the length
    # of the signal's layout as one int64, then the pickled names, dtypes and shapes, only when they
    # changed (here: the first step's, once in the epoch's BATCHES steps).
    shape = found["pipeline"]["block_shapes"][1]
    layout = [("features", "float32", (BATCH, *shape)), ("labels", "int64", (BATCH,))]
    payload = BATCH * torch.Size(shape).numel() * float32 + BATCH * int64
    header = int64 + len(pickle.dumps(layout)) / BATCHES
    assert found["pipeline"]["stats"] == {INTRA: pytest.approx(payload + header), INTER: 0.0}

    # GPipe over blocks [0, 1] | [2, 3], 2 micro-batches: block 2's output goes forward and its
    # gradient comes back (the whole batch's worth in both directions), and the labels go to the
    # last stage (their count, then the labels).
    activation = BATCH * torch.Size(found["gpipe"]["block_shapes"][1]).numel() * float32
    assert found["gpipe"]["stats"] == {INTRA: 2 * activation + int64 + BATCH * int64, INTER: 0.0}

    # async_sgd: every push of rank 1 carries an update of the float state and brings the weights back;
    # rank 0 pushes to its own server (nothing sent); at the epoch's end rank 0 broadcasts its whole state.
    run = found["async_sgd"]
    pushes = run["async_steps"]["async_sgd/rank1/steps"]
    float_state = run["state_bytes"]  # BP's VGG without BatchNorm: all of its state is float parameters
    assert run["stats"][INTRA] == (2 * float_state * pushes + run["state_bytes"]) / BATCHES
    assert run["stats"][INTER] == 0.0
