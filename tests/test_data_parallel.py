"""Data-parallel engines (ddp, hierarchical): N processes against one process with the same global batch,
and node-based averaging against plain DDP, on the CPU (gloo)."""

from __future__ import annotations

import functools
import traceback
from pathlib import Path

from omegaconf import DictConfig

import pytest
import torch

from scpl_kit.engines.launch import set_rank_env
from scpl_kit.engines.sequential import SequentialEngine
from scpl_kit.methods import build_units
from scpl_kit.models import build_model
from scpl_kit.updater import OptimizerSettings, UpdateRecipe

from test_engines import spawn_ranks
from test_training import history, same_weights, weights
from test_methods import tiny_batch

# Every method of the kit, each with the options that let it run on the tiny model below.
METHODS = {"bp": {}, "scpl": {}, "early_exit": {"hidden": 16}, "al": {"bridge_hidden": 16, "code_dim": 8}, "dgl": {},
           "infopro": {}, "contsup": {}, "cascade": {"modules": 2},  # 2 epochs: one per module
           "predsim": {}, "auglocal": {}, "deinforeg": {"projector_dim": 16}}
BATCHES, BATCH = 3, 16
SGD = False


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = tiny_batch(BATCHES * BATCH)
    return [(x[i * BATCH:(i + 1) * BATCH].double(), y[i * BATCH:(i + 1) * BATCH]) for i in range(BATCHES)]


def units_for(method: str, batchnorm: bool = False):
    """The same seeded model and units in every process: VGG without BatchNorm in its blocks."""
    torch.manual_seed(0)
    model = build_model("vgg", (1, 16, 16), 4, width=0.125, predictor_hidden=16, batchnorm=batchnorm)
    return build_units(method, model, 4, **METHODS[method])


def recipe(sgd: bool = False) -> UpdateRecipe:
    """Adam, cosine-decayed over 10 steps; or plain SGD at a constant rate."""
    settings = OptimizerSettings(name="sgd", lr=0.05, schedule="constant") if sgd else OptimizerSettings(lr=3e-3, lr_min=3e-4)
    return UpdateRecipe(settings, steps_per_epoch=10, epochs=1)


def train(engine, method: str, epochs: int = 1, **options) -> list[dict]:
    """`epochs` of `batches()`, in float64: Adam turns a rounding difference in a near-zero gradient into a
    step of the learning rate's size, and float32's would grow past the tolerance within a few steps."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        sgd = options.pop("sgd", False)
        engine.setup(units_for(method, **options), recipe=recipe(sgd))
        for epoch in range(1, epochs + 1):
            for unit in engine.units:
                unit.start_epoch(epoch, epochs)
            engine.train_epoch(batches())
        return [unit.state_dict() for unit in engine.units]
    finally:
        torch.set_default_dtype(default)


def _guarded(main, rank: int, world: int, port: int, result_dir: str, *args) -> None:
    try:
        set_rank_env(rank, world, port)
        main(rank, result_dir, *args)
    except BaseException as error:
        Path(result_dir, f"rank{rank}.err").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise


def reporting_errors(main):
    """A rank's main that leaves its error where spawn_ranks looks (rank<k>.err), so a test shows it."""
    return functools.partial(_guarded, main)


def _ddp_every_method(rank: int, result_dir: str) -> None:
    from scpl_kit.engines.data_parallel import DataParallelEngine

    engine = DataParallelEngine(sync_batchnorm=True, timeout_s=60)
    states = {}
    for method in METHODS:
        states[method] = train(engine, method, epochs=2, sgd=SGD)
    torch.save(states, Path(result_dir).parent / f"states{rank}.pt")  # result_dir holds text only
    engine.close()
@pytest.mark.slow  # processes that time out a stuck peer or train every method: 20-60 s
def test_ddp_on_two_processes_computes_what_one_process_computes_for_every_method(tmp_path: Path) -> None:
    """Two ranks, each with half of every batch, end with the weights one process gets from the whole
    batches (Adam, 2 epochs of 3 steps; heads' BatchNorm over the whole batch; SupCon over it too)."""
    outcome = spawn_ranks(reporting_errors(_ddp_every_method), 2, tmp_path)
    assert not outcome, outcome  # ranks write errors there
    ranks = [torch.load(tmp_path / f"states{r}.pt") for r in range(2)]
    for method in METHODS:
        single = train(SequentialEngine("cpu"), method, epochs=2)
        for replica in ranks:
            for unit, expected in zip(replica[method], single, strict=True):
                for key, value in expected.items():
                    assert torch.allclose(unit[key].float(), value.float(), atol=1e-5, rtol=0), (method, key)


def _hierarchical_against_ddp(rank: int, result_dir: str) -> None:
    from scpl_kit.engines.data_parallel import DataParallelEngine

    out = {}
    for method in ("bp", "early_exit"):
        ddp = DataParallelEngine(ranks_per_node=1, timeout_s=60)
        out[method, "ddp"] = train(ddp, method, sgd=True)
        hierarchical = DataParallelEngine(ranks_per_node=1, average_every=1, timeout_s=60)
        out[method, "hierarchical"] = train(hierarchical, method, sgd=True)
    torch.save(out, Path(result_dir).parent / f"states{rank}.pt")
@pytest.mark.slow  # processes that time out a stuck peer or train every method: 20-60 s
def test_hierarchical_averaging_every_step_equals_ddp(tmp_path: Path) -> None:
    """K' = 1 on 2 simulated nodes: each node steps on its own gradient and the parameters are averaged
    right after, which with SGD is one step on the average gradient, what DDP takes. (With Adam it is
    not: Adam's step is not linear in the gradient. Nor with SupCon: a node's batch is its own share.)"""
    assert not spawn_ranks(reporting_errors(_hierarchical_against_ddp), 2, tmp_path)
    for rank in range(2):
        states = torch.load(tmp_path / f"states{rank}.pt")
        for method in ("bp", "early_exit"):
            for a, b in zip(states[method, "ddp"], states[method, "hierarchical"], strict=True):
                assert all(torch.allclose(a[k], b[k], atol=1e-10, rtol=0) for k in a), method


def _trained_in_two_nodes(engine, steps: list) -> dict:
    """Every rank's first-unit weights after each step and at the epoch's end, and the job's bytes."""
    engine.setup(units_for("scpl"), recipe=recipe())
    after_step = []
    engine.train_epoch(steps, on_batch=lambda n: after_step.append(torch.nn.utils.parameters_to_vector(engine.units[0].parameters()).clone()))
    return {"steps": after_step, "end": torch.nn.utils.parameters_to_vector(engine.units[0].parameters()).clone(),
            "stats": engine.epoch_stats(), "params": sum(p.numel() * p.element_size() for unit in engine.units for p in unit.parameters())}


def _nodes_drift_and_agree(rank: int, result_dir: str) -> None:
    """4 ranks in 2 nodes of 2: parameters exchanged every 3 steps by the node leaders and by every rank,
    once per epoch, and plain DDP."""
    from scpl_kit.engines.data_parallel import DataParallelEngine

    torch.set_default_dtype(torch.float64)
    x, y = tiny_batch(5 * BATCH)
    steps = [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]) for i in range(5)]
    runs = {name: _trained_in_two_nodes(DataParallelEngine(ranks_per_node=2, timeout_s=60, **options), steps) for name, options in {
        "leaders": {"average_every": 3}, "all": {"average_every": 3, "exchange": "all"}, "epoch": {"average_every": "epoch"}, "ddp": {},
    }.items()}
    torch.save(runs, Path(result_dir).parent / f"states{rank}.pt")
@pytest.mark.slow  # processes that time out a stuck peer or train every method: 20-60 s
def test_nodes_drift_between_averages_and_agree_after_one(tmp_path: Path) -> None:
    """Within a node the replicas agree after every step (gradients averaged there); the two nodes' differ
    between exchanges and agree right after one (steps 1 and 4 of 5 at K′ = 3, as torch's averager counts
    from 0; only the epoch's end once per epoch) and at the epoch's end. The node leaders' exchange gives
    the average every rank's gives, with half the bytes across nodes (2 ranks a node) and their result
    broadcast within the node; gradients stay within nodes, against DDP's every gradient every step."""
    assert not spawn_ranks(reporting_errors(_nodes_drift_and_agree), 4, tmp_path)
    ranks = [torch.load(tmp_path / f"states{r}.pt") for r in range(4)]
    for name, exchanged_after in {"leaders": (0, 3), "all": (0, 3), "epoch": ()}.items():
        for step in range(5):
            w = [rank[name]["steps"][step] for rank in ranks]
            assert torch.equal(w[0], w[1]) and torch.equal(w[2], w[3]), (name, step)  # one node, one model
            assert torch.allclose(w[0], w[2], atol=1e-12) == (step in exchanged_after), (name, step)  # the nodes drift, then agree
        assert all(torch.allclose(ranks[0][name]["end"], rank[name]["end"], atol=1e-12) for rank in ranks), name
    for step in range(5):  # the same average, whoever sends it
        assert torch.allclose(ranks[0]["leaders"]["steps"][step], ranks[0]["all"]["steps"][step], atol=1e-12), step
    # The job's bytes (every rank's summed), the same on every rank.
    stats = {name: ranks[0][name]["stats"] for name in ranks[0]}
    assert all(rank[name]["stats"] == stats[name] for rank in ranks for name in rank)
    params, ddp = ranks[0]["ddp"]["params"], stats["ddp"]
    exchanges = 3  # after steps 1 and 4, and at the epoch's end
    assert stats["all"]["comm/inter_node_bytes_per_step"] == pytest.approx(4 * exchanges * params / 5)
    assert stats["leaders"]["comm/inter_node_bytes_per_step"] == pytest.approx(stats["all"]["comm/inter_node_bytes_per_step"] / 2)
    assert stats["epoch"]["comm/inter_node_bytes_per_step"] == pytest.approx(2 * params / 5)  # the leaders, once
    assert stats["all"]["comm/intra_node_bytes_per_step"] == pytest.approx(ddp["comm/inter_node_bytes_per_step"])  # the gradients
    # ... and the leaders' broadcasts of what they averaged, within their nodes.
    assert stats["leaders"]["comm/intra_node_bytes_per_step"] == pytest.approx(ddp["comm/inter_node_bytes_per_step"] + 2 * exchanges * params / 5)
    assert ddp["comm/inter_node_bytes_per_step"] >= 4 * params > stats["all"]["comm/inter_node_bytes_per_step"]  # a gradient per parameter
    assert ddp["comm/intra_node_bytes_per_step"] == 0


def _replicated_pipeline(rank: int, result_dir: str) -> None:
    """2 replicas × 2 stages: each rank's units after 2 epochs, keyed by the units' indices."""
    from scpl_kit.engines.pipeline import PipelineEngine

    engine = PipelineEngine(stages=[[0, 1], [2, 3]], timeout_s=60, replicas=2)
    out = {}
    for method in ("scpl", "early_exit"):
        out[method] = dict(zip(engine.stages[engine.stage], train(engine, method, epochs=2)))
    torch.save(out, Path(result_dir).parent / f"states{rank}.pt")
@pytest.mark.slow  # processes that time out a stuck peer or train every method: 20-60 s
def test_two_replicas_of_a_two_stage_pipeline_compute_what_one_process_computes(tmp_path: Path) -> None:
    """4 ranks: replica r's stages are ranks 2r and 2r+1, each replica trains on half of every batch, and
    each stage's two copies average gradients in their own group. The weights equal one process's on
    the whole batches (a single pipeline computes exactly those: test_engines), SupCon included."""
    assert not spawn_ranks(reporting_errors(_replicated_pipeline), 4, tmp_path)
    ranks = [torch.load(tmp_path / f"states{r}.pt") for r in range(4)]
    for method in ("scpl", "early_exit"):
        single = train(SequentialEngine("cpu"), method, epochs=2)
        for rank, states in enumerate(ranks):
            for index, state in states[method].items():
                assert index in ([0, 1] if rank % 2 == 0 else [2, 3])
                assert all(torch.allclose(state[k], single[index][k], atol=1e-5, rtol=0) for k in state), (method, rank, index)


def _run_killed_in_epoch(rank: int, result_dir: str, cfg: DictConfig, killed_in: int | None) -> None:
    """The CLI's `run` on this rank; every rank stopped as the job would be, at the start of epoch `killed_in`."""
    from scpl_kit.train import run
    from scpl_kit.trainer import Trainer

    real_run_epoch = Trainer.run_epoch

    def run_epoch(self, epoch):
        if epoch == killed_in:
            raise KeyboardInterrupt
        return real_run_epoch(self, epoch)

    Trainer.run_epoch = run_epoch
    try:
        run(cfg)
    except KeyboardInterrupt:
        Path(result_dir).parent.joinpath(f"killed{rank}").touch()


@pytest.mark.slow
def test_ddp_run_is_tracked_checkpointed_and_resumes_to_the_uninterrupted_result(smoke_config, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ("method=scpl", "engine=ddp", "engine.timeout_s=120", "trainer.threads=1")
    killed = smoke_config(*common, "tracking.enabled=true", f"tracking.uri={uri}")
    uninterrupted = smoke_config(*common, f"out_dir={tmp_path / 'ref'}", f"trainer.checkpoint_dir={tmp_path / 'ref_ckpt'}")
    assert not spawn_ranks(reporting_errors(_run_killed_in_epoch), 2, tmp_path, killed, 2)
    assert (tmp_path / "killed0").exists() and list((tmp_path / "checkpoints").glob("*.pt"))
    for cfg in (killed, uninterrupted):  # the same command again resumes; the reference runs start to end
        assert not spawn_ranks(reporting_errors(_run_killed_in_epoch), 2, tmp_path, cfg, None)
    assert history(tmp_path / "out") == history(tmp_path / "ref")
    assert same_weights(weights(tmp_path / "out"), weights(tmp_path / "ref"))
    client = MlflowClient(uri)
    (only,) = client.search_runs([client.get_experiment_by_name("scpl-kit").experiment_id])  # one run, resumed
    assert only.data.tags["engine"] == "ddp" and only.data.tags["outcome"] == "completed"
    sent = client.get_metric_history(only.info.run_id, "comm/intra_node_bytes_per_step")
    assert [m.step for m in sent] == [1, 2] and all(m.value > 0 for m in sent)
