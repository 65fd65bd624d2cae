"""The update step (scpl_kit.updater): each option against a formula written out here, and the same
update under every engine (threads and pipeline bitwise equal to sequential)."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from scpl_kit.engines.sequential import SequentialEngine
from scpl_kit.methods import build_units
from scpl_kit.methods.heads import CrossEntropyHead
from scpl_kit.methods.units import LocalUnit
from scpl_kit.models import build_model
from scpl_kit.train import run
from scpl_kit.updater import OptimizerSettings, UpdateRecipe, Updater, train_step

from conftest import sequential_run
from test_engines import assert_same_run, run_ranks

# SGD with Nesterov momentum and weight decay, a linear warm-up over half the first epoch, then
# cosine, every unit's gradient clipped: the local-learning papers' recipe at the smoke profile's scale.
RECIPE = ("optimizer=sgd", "optimizer.lr=0.05", "optimizer.weight_decay=5e-4", "optimizer.warmup_epochs=0.5", "optimizer.clip_norm=0.5")


def updater(settings: OptimizerSettings, steps_per_epoch: int = 5, epochs: int = 10) -> Updater:
    return Updater("unit", [{"params": [nn.Parameter(torch.zeros(1))]}], settings, steps_per_epoch, epochs)


def rates(updater: Updater, steps: int) -> list[float]:
    """The rate before each of `steps` optimizer steps (no gradients: the weights stay)."""
    seen = []
    for _ in range(steps):
        seen.append(updater.lr)
        updater.finish_step()
    return seen


def test_warmup_then_cosine_follows_the_formula() -> None:
    lr, warm, total = 0.8, 10, 50  # 2 warm-up epochs of 5 steps, 10 epochs
    got = rates(updater(OptimizerSettings(name="sgd", lr=lr, lr_min=0.0, momentum=0.9, nesterov=True, warmup_epochs=2)), total)
    want = [lr * (1 / warm + (1 - 1 / warm) * t / warm) if t < warm else 0.5 * lr * (1 + math.cos(math.pi * (t - warm) / (total - warm)))
            for t in range(total)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_step_schedule_multiplies_by_gamma_at_each_milestone() -> None:
    got = rates(updater(OptimizerSettings(name="sgd", lr=0.1, schedule="step", milestones=(2, 4), gamma=0.2)), 30)
    assert got == pytest.approx([0.1 * 0.2 ** ((t >= 10) + (t >= 20)) for t in range(30)])


def test_plateau_lowers_the_rate_after_patience_epochs_without_a_better_validation_accuracy() -> None:
    step = updater(OptimizerSettings(name="sgd", lr=0.01, schedule="plateau", patience=1, gamma=0.1, lr_min=1e-4))
    seen = []
    for val_acc in (0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6):
        step.end_epoch(val_acc)
        seen.append(step.lr)
    assert seen == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4, 1e-4])  # never below lr_min


def bp_unit(seed: int = 0) -> LocalUnit:
    torch.manual_seed(seed)
    return LocalUnit("net", nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), head=CrossEntropyHead())


def batch(n: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"features": torch.randn(n, 6), "labels": torch.randint(0, 3, (n,))}


def test_clipping_scales_the_whole_gradient_to_the_norm() -> None:
    unit, reference = bp_unit(), bp_unit()
    train_step(unit, Updater("net", unit.parameter_groups(), OptimizerSettings(name="sgd", lr=0.1, schedule="constant", clip_norm=0.05), 1, 1), batch())
    loss = nn.functional.cross_entropy(reference.body(batch()["features"]), batch()["labels"])
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    assert norm > 0.05  # the clipping acts
    for p, q, g in zip(unit.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p, q - 0.1 * g * 0.05 / (norm + 1e-6))


def test_accumulating_two_half_batches_is_one_step_on_the_whole_batch() -> None:
    whole, halves = bp_unit(), bp_unit()
    sgd = OptimizerSettings(name="sgd", lr=0.1, schedule="constant")
    train_step(whole, Updater("net", whole.parameter_groups(), sgd, 1, 1), batch())
    accumulating = Updater("net", halves.parameter_groups(), OptimizerSettings(name="sgd", lr=0.1, schedule="constant", accumulate=2), 2, 1)
    first, second = ({k: v[4 * i:4 * i + 4] for k, v in batch().items()} for i in range(2))
    train_step(halves, accumulating, first)
    assert all(torch.equal(p, q) for p, q in zip(halves.parameters(), bp_unit().parameters()))  # no step after one half
    train_step(halves, accumulating, second)
    for p, q in zip(halves.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q)


def test_a_label_path_scale_multiplies_the_rate_of_its_group() -> None:
    """AL's parameter groups: the label path at `label_lr_scale` times the rate, under every schedule."""
    torch.manual_seed(0)
    model = build_model("vgg", (1, 16, 16), 4, width=0.0625, predictor_hidden=16)
    unit = build_units("al", model, 4, bridge_hidden=16, code_dim=8, label_lr_scale=3.0)[0]
    step = UpdateRecipe(OptimizerSettings(name="sgd", lr=0.1, schedule="constant"), 10, 1).updater(unit)
    assert [g["lr"] for g in step.optimizer.param_groups] == pytest.approx([0.1, 0.3])


def test_bf16_runs_the_forward_in_bfloat16_and_learns() -> None:
    torch.manual_seed(0)
    model = build_model("vgg", (1, 16, 16), 4, width=0.0625, predictor_hidden=16)
    units = build_units("scpl", model, 4, projector_hidden=32, projector_dim=16)
    engine = SequentialEngine("cpu")
    engine.setup(units, recipe=UpdateRecipe(OptimizerSettings(lr=3e-3, lr_min=3e-3, precision="bf16"), 1, 16))
    step = engine.updaters[0].forward(units[0], {"features": torch.randn(4, 1, 16, 16), "labels": torch.zeros(4, dtype=torch.long)})
    assert step.outputs["features"].dtype == torch.bfloat16
    torch.manual_seed(2)
    batches = [(torch.randn(32, 1, 16, 16), torch.arange(32) % 4)]
    first = engine.train_epoch(batches)
    for _ in range(15):
        last = engine.train_epoch(batches)
    assert all(math.isfinite(v) for v in last.values())
    assert sum(last.values()) < sum(first.values()), (first, last)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights and updates stay float32


@pytest.mark.parametrize("method", ["scpl", "al"])
def test_threads_engine_matches_sequential_with_the_sgd_recipe(smoke_config, tmp_path: Path, method: str) -> None:
    expected = sequential_run(smoke_config, tmp_path / "sequential", f"method={method}", *RECIPE)
    run(smoke_config(f"method={method}", *RECIPE, "trainer.threads=1", "engine=threads", "engine.devices=[cpu,cpu]", f"out_dir={tmp_path / 'threads'}"))
    assert_same_run(expected, tmp_path / "threads")


@pytest.mark.slow
def test_pipeline_engine_matches_sequential_with_the_sgd_recipe(smoke_config, tmp_path: Path) -> None:
    expected = sequential_run(smoke_config, tmp_path / "sequential", "method=scpl", *RECIPE)
    cfg = smoke_config("method=scpl", *RECIPE, "trainer.threads=1", "engine=pipeline", "engine.timeout_s=120", f"out_dir={tmp_path / 'pipeline'}")
    reports = run_ranks(cfg, 2, tmp_path)
    assert sorted(reports) == ["rank0.ok", "rank1.ok"], reports
    assert_same_run(expected, tmp_path / "pipeline")
