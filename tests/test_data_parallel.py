"""Data-parallel engines (ddp, hierarchical): N processes against one process with the same global batch,
and node-based averaging against plain DDP, on the CPU (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scpl_kit.engines.launch import set_rank_env
from scpl_kit.engines.sequential import SequentialEngine
from scpl_kit.methods import build_units
from scpl_kit.models import build_model
from scpl_kit.trainer import adam_cosine

from test_engines import spawn_ranks
from test_methods import tiny_batch

# Every method of the kit, each with the options that let it run on the tiny model below.
METHODS = {"bp": {}, "scpl": {}, "early_exit": {"hidden": 16}, "al": {"bridge_hidden": 16, "code_dim": 8}, "dgl": {},
           "infopro": {}, "contsup": {}, "cascade": {}}
BATCHES, BATCH = 3, 16
SGD = False


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = tiny_batch(BATCHES * BATCH)
    return [(x[i * BATCH:(i + 1) * BATCH].double(), y[i * BATCH:(i + 1) * BATCH]) for i in range(BATCHES)]


def units_for(method: str, batchnorm: bool = False, sgd: bool = False):
    """The same seeded model and units in every process: VGG without BatchNorm in its blocks."""
    torch.manual_seed(0)
    model = build_model("vgg", (1, 16, 16), 4, width=0.125, predictor_hidden=16, batchnorm=batchnorm)
    units = build_units(method, model, 4, **METHODS[method])
    for unit in units:
        if sgd:
            unit.configure_optimizer(lambda params, share=1.0: (torch.optim.SGD(params, lr=0.05), None))
        else:
            unit.configure_optimizer(adam_cosine(3e-3, 3e-4, 10))
    return units


def train(engine, method: str, epochs: int = 1, **options) -> list[dict]:
    """`epochs` of `batches()`, in float64: Adam turns a rounding difference in a near-zero gradient into a
    step of the learning rate's size, and float32's would grow past the tolerance within a few steps."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        units = units_for(method, **options)
        engine.setup(units)
        for epoch in range(1, epochs + 1):
            for unit in engine.units:
                unit.start_epoch(epoch, epochs)
            engine.train_epoch(batches())
        return [unit.state_dict() for unit in engine.units]
    finally:
        torch.set_default_dtype(default)


def _ddp_every_method(rank: int, world: int, port: int, result_dir: str) -> None:
    set_rank_env(rank, world, port)
    from scpl_kit.engines.data_parallel import DataParallelEngine

    engine = DataParallelEngine(sync_batchnorm=True, timeout_s=60)
    states = {}
    for method in METHODS:
        engine.sent.clear()
        states[method] = train(engine, method, epochs=2, sgd=SGD)
    torch.save(states, Path(result_dir).parent / f"states{rank}.pt")  # result_dir holds text only
    engine.close()


def test_ddp_on_two_processes_computes_what_one_process_computes_for_every_method(tmp_path: Path) -> None:
    """Two ranks, each with half of every batch, end with the weights one process gets from the whole
    batches (Adam, 2 epochs of 3 steps; heads' BatchNorm over the whole batch; SupCon over it too)."""
    outcome = spawn_ranks(_ddp_every_method, 2, tmp_path)
    assert not outcome, outcome  # ranks write errors there
    ranks = [torch.load(tmp_path / f"states{r}.pt") for r in range(2)]
    for method in METHODS:
        single = train(SequentialEngine("cpu"), method, epochs=2)
        for replica in ranks:
            for unit, expected in zip(replica[method], single, strict=True):
                for key, value in expected.items():
                    assert torch.allclose(unit[key].float(), value.float(), atol=1e-5, rtol=0), (method, key)
