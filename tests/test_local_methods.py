"""The local-learning family (DGL, InfoPro, ContSup, deep cascade learning) and K modules cut at any layer:
cuts cover every layer once, each method's special part against a computation written out here, and
every engine computing what the sequential one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scpl_kit.methods import build_units
from scpl_kit.methods.contsup import PREVIOUS
from scpl_kit.models import build_model
from scpl_kit.models.base import Chain, CutError, even_cuts
from scpl_kit.signal import INPUT
from scpl_kit.train import run
from updates import attach, step

from conftest import sequential_run
from test_engines import assert_same_run, run_ranks
from test_methods import tiny_batch

# model → (number of layers, the K values the issue names)
CUTTABLE = {"vgg": (6, [2, 4, 6]), "resnet18": (8, [2, 4, 8]), "resnet32": (16, [2, 4, 8, 16]), "resnet110": (55, [2, 4, 8, 16])}
LOCAL = ["dgl", "infopro", "contsup", "cascade", "predsim", "auglocal", "deinforeg"]


def model_of(name: str, classes: int = 4):
    torch.manual_seed(0)
    return build_model(name, (1, 16, 16), classes, width=0.25 if name.startswith("resnet") else 0.0625)


def units_of(method: str, modules: int = 4, **options):
    model = model_of("vgg")
    units = build_units(method, model, 4, modules=modules, **options)
    attach(units, 3e-3, 3e-3, 100)
    return model, units


@pytest.mark.parametrize("name", CUTTABLE)
def test_k_modules_cover_every_layer_exactly_once(name: str) -> None:
    layers, ks = CUTTABLE[name]
    model = model_of(name)
    original = model.layers()
    assert len(original) == layers
    x = torch.randn(2, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    for k in ks:
        model.recut(k)
        assert len(model.blocks) == k
        in_blocks = [layer for block in model.blocks for layer in (block if isinstance(block, Chain) else [block])]
        assert [id(layer) for layer in in_blocks] == [id(layer) for layer in original]  # every layer once, in order
        sizes = [len(block) if isinstance(block, Chain) else 1 for block in model.blocks]
        assert max(sizes) - min(sizes) <= 1  # as even as K allows
        with torch.no_grad():
            assert torch.equal(model(x), expected)  # the same network, only grouped differently
    model.recut(cuts=[1, layers - 1])
    assert [len(block) if isinstance(block, Chain) else 1 for block in model.blocks] == [1, layers - 2, 1]


def test_cut_points_that_do_not_fit_name_the_valid_range() -> None:
    model = model_of("vgg")
    with pytest.raises(CutError, match=r"method.modules=7 does not fit this model: it has 6 layers, so K can be 1\.\.6"):
        model.recut(7)
    with pytest.raises(CutError, match=r"increasing layer indices in 1\.\.5"):
        model.recut(cuts=[3, 2])
    with pytest.raises(CutError, match=r"in 1\.\.5"):
        model.recut(cuts=[0, 3])
    assert even_cuts(6, 4) == [2, 4, 5] and even_cuts(8, 4) == [2, 4, 6] and even_cuts(16, 16) == list(range(1, 16))


def test_the_default_cut_is_the_papers_four_blocks() -> None:
    """VGG8's 6 convs in 4 blocks are [conv, conv+pool] [conv, conv+pool] [conv+pool] [conv+pool]."""
    model = model_of("vgg")
    shapes = model.block_output_shapes()
    model.recut(4)
    assert model.block_output_shapes() == shapes == [(16, 8, 8), (32, 4, 4), (32, 2, 2), (32, 1, 1)]


def test_k_is_a_key_of_every_method_config() -> None:
    from scpl_kit.config import compose_config

    for method in ["bp", "scpl", "early_exit", "al", *LOCAL]:
        cfg = compose_config([f"method={method}", "method.modules=6"])
        assert cfg.method.modules == 6 and cfg.method.cuts is None


def test_infopro_reconstruction_loss_against_a_computation_written_out() -> None:
    """InfoPro's: the decoder's sigmoid against the input in [0, 1] pixels (the data's normalisation,
    which the model carries, undone), mean binary cross-entropy."""
    model = model_of("vgg")
    mean, std = 0.3, 0.2
    model.set_input_statistics([mean], [std])
    unit = build_units("infopro", model, 4, modules=2, loss="ce", recon_weight=[2.0, 0.0], head_weight=[0.5, 1.0])[0]
    _, y = tiny_batch(8)
    image = torch.rand(8, 1, 16, 16)  # pixels in [0, 1]
    x = (image - mean) / std
    step = unit.forward_train({"features": x, "labels": y})
    losses = unit.local_losses(step)
    h = step.outputs["features"]
    assert torch.equal(step.outputs[INPUT], x)  # the input travels on for later modules
    # The decoder written out: bilinear upsampling to 16×16, conv → BN (batch statistics) → ReLU → conv.
    conv1, bn, _, conv2 = unit.decoder.net
    up = F.interpolate(h, size=(16, 16), mode="bilinear", align_corners=True)
    z = F.conv2d(up, conv1.weight, conv1.bias, padding=1)
    z = (z - z.mean((0, 2, 3), keepdim=True)) / torch.sqrt(z.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps)
    z = F.conv2d(torch.relu(z * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]), conv2.weight, conv2.bias, padding=1)
    p = torch.sigmoid(z)
    expected = 2.0 * -(image * torch.log(p) + (1 - image) * torch.log(1 - p)).mean()  # λ1 of module 1 is recon_weight[0]
    torch.testing.assert_close(losses["block1/reconstruction"], expected)
    torch.testing.assert_close(losses["block1/ce"], 0.5 * F.cross_entropy(unit.head.classifier(h), y))


def test_infopro_weights_move_linearly_over_the_local_modules() -> None:
    _, units = units_of("infopro", modules=4, recon_weight=[5.0, 0.0], head_weight=[0.5, 1.0])
    assert [u.recon_weight for u in units[:-1]] == [5.0, 2.5, 0.0]
    assert [u.head_weight for u in units[:-1]] == [0.5, 0.75, 1.0]
    assert units[-1].predictor_trains_body and units[-1].head is None


@pytest.mark.parametrize("context", ["E", "R1", "R1E"])
def test_contsup_context_shapes_and_inference_uses_it(context: str) -> None:
    model, units = units_of("contsup", modules=4, context=context)
    shapes = model.block_output_shapes()
    x, y = tiny_batch(8)
    signal = {"features": x, "labels": y}
    entering = [(1, 16, 16)]
    for k, unit in enumerate(units):
        expected = [] if k == 0 else ["E"] if (k, context) == (1, "R1E") else sorted(context.replace("R1", "R1 ").split())
        assert sorted(unit.encoders) == expected  # at the first boundary R1's context is the input, which E covers
        if k:
            supplied = unit.supplied(signal)["features"]
            assert supplied.shape == signal["features"].shape  # h + M(c) keeps the boundary's shape
            for kind, encoder in unit.encoders.items():
                source = x if kind == "E" else signal[PREVIOUS]
                assert tuple(encoder(source).shape[1:]) == shapes[k - 1]
        signal, _ = step(unit, signal)
        entering.append(shapes[k])
        assert torch.equal(signal[INPUT], x) and tuple(signal[PREVIOUS].shape[1:]) == entering[k]

    def predict() -> torch.Tensor:
        out = {"features": x}
        for unit in units:
            unit.eval()
            out = unit.infer(out)
        return out["scores"]

    with torch.no_grad():
        with_context = predict()
        for unit in units:
            for encoder in unit.encoders.values():
                nn.init.zeros_(encoder[-3].weight)  # the last BatchNorm (then ReLU, pooling): M(c) = 0
                nn.init.zeros_(encoder[-3].bias)
        without_context = predict()
    assert not torch.allclose(with_context, without_context)


def test_contsup_context_encoders_learn_from_the_module_they_feed() -> None:
    _, units = units_of("contsup", modules=2, context="E")
    x, y = tiny_batch(8)
    handed, _ = step(units[0], {"features": x, "labels": y})
    assert all(p.grad is None or not p.grad.any() for p in units[1].encoders.parameters())
    step(units[1], handed)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in units[1].encoders["E"].parameters())


def test_cascade_freezes_each_module_bit_for_bit_once_its_turn_is_over() -> None:
    _, units = units_of("cascade", modules=3)
    batches = [tiny_batch(16) for _ in range(2)]
    epochs = 3
    for epoch in range(1, epochs + 1):
        for unit in units:
            unit.start_epoch(epoch, epochs)
            unit.train()
        assert [u.role for u in units] == ["frozen"] * (epoch - 1) + ["active"] + ["waiting"] * (epochs - epoch)
        before = [{k: v.clone() for k, v in u.state_dict().items()} for u in units]
        for x, y in batches:
            signal = {"features": x, "labels": y}
            for unit in units:
                signal, losses = step(unit, signal)
                assert bool(losses) == (unit.role == "active")
        after = [u.state_dict() for u in units]
        for k, unit in enumerate(units):
            same = all(torch.equal(before[k][name], after[k][name]) for name in before[k])
            assert same == (unit.role != "active"), (epoch, k)  # BatchNorm statistics included
    assert all(int(u.trained) == 1 for u in units)


def test_cascade_reads_out_the_latest_trained_module() -> None:
    _, units = units_of("cascade", modules=2)
    x, y = tiny_batch(8)
    for unit in units:
        unit.start_epoch(1, 2)
    step(units[0], {"features": x, "labels": y})
    out = {"features": x}
    for unit in units:
        unit.eval()
        out = unit.infer(out)
    assert set(out) >= {"scores", "exit/block1"} and torch.equal(out["scores"], out["exit/block1"])
    assert int(units[1].trained) == 0  # not reached: no readout of its own


# -- engines ------------------------------------------------------------------------------------------

ENGINE_CASES = {"dgl": [], "infopro": [], "contsup": ["method.context=R1E"], "cascade": ["method.modules=2"], "predsim": [], "auglocal": [],
                "deinforeg": []}


@pytest.mark.parametrize("method", LOCAL)
def test_threads_engine_matches_sequential(smoke_config, tmp_path: Path, method: str) -> None:
    extra = ENGINE_CASES[method]
    expected = sequential_run(smoke_config, tmp_path / "sequential", f"method={method}", *extra)
    run(smoke_config(f"method={method}", *extra, "trainer.threads=1", "engine=threads", "engine.devices=[cpu,cpu]", f"out_dir={tmp_path / 'threads'}"))
    assert_same_run(expected, tmp_path / "threads")


@pytest.mark.slow
@pytest.mark.parametrize("method", LOCAL)
def test_pipeline_engine_matches_sequential(smoke_config, tmp_path: Path, method: str) -> None:
    """ContSup's context and InfoPro's input travel between the processes with the activations;
    cascade's waiting stages hand their input on, its frozen ones only run forward."""
    extra = ENGINE_CASES[method]
    expected = sequential_run(smoke_config, tmp_path / "sequential", f"method={method}", *extra)
    cfg = smoke_config(f"method={method}", *extra, "trainer.threads=1", "engine=pipeline", "engine.timeout_s=120", f"out_dir={tmp_path / 'pipeline'}")
    reports = run_ranks(cfg, 2, tmp_path)
    assert sorted(reports) == ["rank0.ok", "rank1.ok"], reports
    assert_same_run(expected, tmp_path / "pipeline")


def test_cascade_under_gpipe_is_refused(smoke_config, tmp_path: Path) -> None:
    reports = run_ranks(smoke_config("method=cascade", "engine=gpipe", "engine.timeout_s=30"), 2, tmp_path)
    assert sorted(reports) == ["rank0.err", "rank1.err"] and all("engine=pipeline" in text for text in reports.values())


def test_one_modules_peak_memory_is_a_share_of_the_whole_networks() -> None:
    """The memory column of the local_k table: a module of K = 6 holds one conv's activations, BP all six."""
    from scpl_kit.memory import unit_peak_memory

    peaks = {}
    for method, k in (("bp", None), ("dgl", 6)):
        _, units = units_of(method, modules=k)
        x, y = tiny_batch(64)
        peaks[method] = unit_peak_memory(units, {"features": x, "labels": y})
    assert len(peaks["bp"]) == 1 and len(peaks["dgl"]) == 6
    assert 0 < max(peaks["dgl"]) < peaks["bp"][0]


def test_infopro_takes_the_authors_lambdas_for_its_model_and_k() -> None:
    """comand.sh, ResNet-32 at K = 4: (λ1, λ2) = (6, 0) at module 1 and (1, 2) at module 3, linear in
    between (i / (K − 2)); a K the table lacks is refused in one line."""
    torch.manual_seed(0)
    model = build_model("resnet32", (3, 16, 16), 4, width=0.25)
    units = build_units("infopro", model, 4, modules=4, lambdas="resnet32")
    assert [u.recon_weight for u in units[:-1]] == [6.0, 3.5, 1.0]
    assert [u.head_weight for u in units[:-1]] == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="method.lambdas='resnet32' at K = 3: the authors' table has resnet32: K = 2, 4, 8, 16"):
        build_units("infopro", build_model("resnet32", (3, 16, 16), 4, width=0.25), 4, modules=3, lambdas="resnet32")


def test_contsup_reconstructs_with_infopros_decoder_and_weights() -> None:
    torch.manual_seed(0)
    model = build_model("resnet110", (3, 16, 16), 4, width=0.25)
    units = build_units("contsup", model, 4, modules=2, reconstruct=True, lambdas="resnet110")
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    first = units[0]
    step_ = first.forward_train({"features": x, "labels": y})
    losses = first.local_losses(step_)
    assert first.weights == (5.0, 0.5)  # ResNet-110 at K = 2: λ1 = 5, λ2 = 0.5
    h = step_.outputs["features"]
    torch.testing.assert_close(losses["block1/reconstruction"], 5.0 * F.binary_cross_entropy_with_logits(first.decoder(h), x))
    torch.testing.assert_close(losses["block1/ce"], 0.5 * F.cross_entropy(first.head.classifier(h), y))
    assert units[-1].decoder is None  # the last module learns from the network's classifier alone
    plain = build_units("contsup", model_of("vgg"), 4, modules=2)[0]  # reconstruct: false, the default
    x, y = tiny_batch(8)
    assert set(plain.local_losses(plain.forward_train({"features": x, "labels": y}))) == {"block1/ce"}


def test_greedy_sl_head_is_a_pooled_linear_classifier() -> None:
    """The InfoPro paper's Greedy SL: global average pooling, one Linear; the last module learns from
    the network's classifier."""
    _, units = units_of("greedy_sl", modules=2)
    x, y = tiny_batch(8)
    step_ = units[0].forward_train({"features": x, "labels": y})
    h = step_.outputs["features"]
    linear = [m for m in units[0].head.modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 1 and linear[0].in_features == h.shape[1]
    expected = F.cross_entropy(F.linear(h.mean((2, 3)), linear[0].weight, linear[0].bias), y)
    torch.testing.assert_close(units[0].local_losses(step_)["block1/ce"], expected)
    assert units[1].head is None and units[1].predictor_trains_body


@pytest.mark.parametrize(("epochs", "modules", "rule", "expected"), [
    (100, 4, "growing", [10, 20, 30, 40]),  # the authors' 10 + 10·i
    (4, 2, "growing", [1, 3]), (10, 3, "growing", [2, 3, 5]),  # shares ∝ i + 1, largest remainder
    (4, 4, "growing", [1, 1, 1, 1]), (5, 4, "growing", [1, 1, 1, 2]),  # at least one epoch each
    (5, 2, "even", [3, 2]), (4, 4, "even", [1, 1, 1, 1]), (7, 3, "even", [3, 2, 2]),
])
def test_cascade_shares_out_the_epochs(epochs: int, modules: int, rule: str, expected: list[int]) -> None:
    from scpl_kit.methods.cascade import epochs_per_stage

    got = epochs_per_stage(epochs, modules, rule)
    assert got == expected and sum(got) == epochs
    _, units = units_of("cascade", modules=modules, stage_epochs=rule)
    turns = []
    for epoch in range(1, epochs + 1):
        for unit in units:
            unit.start_epoch(epoch, epochs)
        turns.append([u.role for u in units].index("active"))
    assert [turns.count(k) for k in range(modules)] == expected
    assert [u.epochs_trained(epochs) for u in units] == expected  # each schedule spans its own stage


def test_cascade_refuses_fewer_epochs_than_modules() -> None:
    from scpl_kit.methods.cascade import epochs_per_stage

    assert epochs_per_stage(3, 4, "even") == [1, 1, 1, 0]
    _, units = units_of("cascade", modules=4)
    with pytest.raises(ValueError, match="trainer.epochs=3 is fewer than deep cascade's 4 modules"):
        units[0].start_epoch(1, 3)


def test_cascade_authors_head_and_plateau_schedule_per_stage() -> None:
    """The authors' head: Flatten → Dropout 0.5 → 512 → ReLU → Dropout 0.5 → 256 → ReLU → classes. A
    plateau schedule steps only for the module whose stage it is."""
    from scpl_kit.engines.sequential import SequentialEngine
    from scpl_kit.updater import OptimizerSettings, UpdateRecipe

    _, units = units_of("cascade", modules=2, head="authors")
    kinds = [type(m).__name__ for m in units[0].head.classifier]
    assert kinds == ["Flatten", "Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert [m.out_features for m in units[0].head.classifier if isinstance(m, nn.Linear)] == [512, 256, 4]
    engine = SequentialEngine("cpu")
    engine.setup(units, recipe=UpdateRecipe(OptimizerSettings(name="sgd", lr=0.01, momentum=0.9, schedule="plateau", patience=0), 1, 4))
    for epoch in (1, 2):
        for unit in units:
            unit.start_epoch(epoch, 4)
        engine.end_epoch(0.5)
    assert [u.lr for u in engine.updaters] == pytest.approx([0.001, 0.01])  # module 1's rate dropped on its own plateau only


def test_balanced_cuts_are_infopro_stars() -> None:
    """ResNet-110 at K = 2: InfoPro*'s cut after BasicBlock 15 (the stem is layer 0); a K it lacks is refused."""
    model = build_model("resnet110", (3, 16, 16), 4, width=0.25)
    build_units("infopro", model, 4, modules=2, cuts="balanced")
    assert [len(block) for block in model.blocks] == [16, 39]
    with pytest.raises(CutError, match="balanced cuts for K = 2, 3, 4, not method.modules=8"):
        build_units("infopro", build_model("resnet110", (3, 16, 16), 4, width=0.25), 4, modules=8, cuts="balanced")
