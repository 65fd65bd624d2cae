import pytest
import torch
import torch.nn.functional as F

from scpl_kit.methods import METHODS, build_units
from scpl_kit.methods.heads import build_projector
from scpl_kit.models import MODELS, build_model
from scpl_kit.registry import UnknownNameError
from updates import attach, step


def small_vgg(shape=(1, 28, 28), classes=10):
    torch.manual_seed(0)
    return build_model("vgg", shape, classes, width=0.0625, predictor_hidden=32)


@pytest.mark.parametrize(("shape", "flat"), [((3, 32, 32), 2048), ((1, 28, 28), 512)])
def test_paper_vgg_shapes(shape, flat) -> None:
    model = build_model("vgg", shape, 10)
    assert len(model.blocks) == 4
    side = shape[-1]
    expected = [(256, side // 2, side // 2), (512, side // 4, side // 4), (512, side // 8, side // 8), (512, side // 16, side // 16)]
    assert model.block_output_shapes() == expected
    assert model.predictor[1].in_features == flat  # Linear(2048, 2500) at 32×32, as in the paper
    assert model.predictor[1].out_features == 2500
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_built_model_is_in_training_mode() -> None:
    """Sizing the predictor runs the blocks once in eval mode (so BatchNorm's running statistics
    stay untouched); the model must still come back training, BatchNorm on batch statistics."""
    model = build_model("vgg", (3, 32, 32), 10, width=0.125)
    assert all(module.training for module in model.modules())
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.running_mean.abs().sum() == 0 and int(bn.num_batches_tracked) == 0


def test_width_scales_channels() -> None:
    assert [s[0] for s in small_vgg().block_output_shapes()] == [16, 32, 32, 32]


@pytest.mark.parametrize(("kind", "pool", "out_dim"), [("i", False, 16 * 14 * 14), ("i", True, 16), ("l", False, 64), ("m", False, 64), ("m", True, 64)])
def test_projector_shapes(kind, pool, out_dim) -> None:
    projector = build_projector(kind, (16, 14, 14), pool, hidden=32, out=64)
    assert projector(torch.randn(3, 16, 14, 14)).shape == (3, out_dim)


def test_pooled_mlp_projector_is_much_smaller() -> None:
    flat, pooled = (sum(p.numel() for p in build_projector("m", (64, 14, 14), pool).parameters()) for pool in (False, True))
    assert pooled * 10 < flat  # 64·512 + 512·1024 weights against 12544·512 + 512·1024


def units_with_optimizers(method, **options):
    model = small_vgg()
    units = build_units(method, model, 10, **options)
    attach(units, 1e-3, 1e-5, 10)
    return model, units


def batch(n=16):
    torch.manual_seed(1)
    return torch.randn(n, 1, 28, 28), torch.arange(n) % 4


def signal(n=16):
    x, y = batch(n)
    return {"features": x, "labels": y}


def test_scpl_units_partition_the_model() -> None:
    model, units = units_with_optimizers("scpl", projector="m", projector_hidden=32, projector_dim=16)
    assert [u.name for u in units] == ["block1", "block2", "block3", "block4"]
    assert [u.body for u in units] == list(model.blocks)
    assert units[-1].predictor is model.predictor and all(u.predictor is None for u in units[:-1])
    model_params = {id(p) for p in model.parameters()}
    owned = [id(p) for u in units for p in u.parameters() if id(p) in model_params]
    assert sorted(owned) == sorted(model_params)  # every model parameter in exactly one unit


def test_no_gradient_crosses_a_block() -> None:
    """Block k's parameters get nothing from block k+1's loss: their gradients after block k's
    step are unchanged by block k+1's backward, and block k's output arrives detached."""
    _, units = units_with_optimizers("scpl", projector="l", projector_dim=16)
    h, _ = step(units[0], signal())
    assert not any(t.requires_grad for t in h.values())
    before = [p.grad.clone() for p in units[0].body.parameters()]
    step(units[1], h)
    after = [p.grad for p in units[0].body.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_later_blocks_do_not_change_earlier_blocks_updates() -> None:
    """Training all four units gives block 1 exactly the weights that training block 1 alone gives."""
    _, alone = units_with_optimizers("scpl", projector="m", projector_hidden=32, projector_dim=16)
    _, full = units_with_optimizers("scpl", projector="m", projector_hidden=32, projector_dim=16)
    for _ in range(3):
        step(alone[0], signal())
        h = signal()
        for unit in full:
            h, _ = step(unit, h)
    for a, b in zip(alone[0].state_dict().values(), full[0].state_dict().values()):
        assert torch.equal(a, b)


def test_predictor_gradient_never_reaches_the_backbone() -> None:
    _, units = units_with_optimizers("scpl", projector="i")
    last = units[-1]
    last.head = None  # only the predictor's loss remains
    h = signal()
    for unit in units[:-1]:
        h, _ = step(unit, h)
    step(last, h)
    assert all(p.grad is None for p in last.body.parameters())
    assert all(p.grad is not None for p in last.predictor.parameters())


def test_bp_is_one_unit_training_every_parameter() -> None:
    model, units = units_with_optimizers("bp")
    assert len(units) == 1
    _, losses = step(units[0], signal())
    assert set(losses) == {"predictor/ce"}  # filed where SCPL files its predictor's loss: charts overlay
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("model_name", ["vgg", "transformer"])
def test_bp_with_activation_checkpointing_keeps_less_and_computes_plain_bps_gradients(model_name: str) -> None:
    """BP's `checkpoint` keeps only each block's input for the backward (fewer saved bytes, counted by
    autograd's saved-tensor hooks) and recomputes the rest: the loss and every gradient are plain BP's
    (the Transformer's dropout included: the recomputation repeats its random draws)."""
    runs = {}
    for checkpoint in (False, True):
        torch.manual_seed(0)
        shape = (1, 16, 16) if model_name == "vgg" else (16,)
        model = build_model(model_name, shape, 4, **({"width": 0.125, "predictor_hidden": 16} if model_name == "vgg" else {"vocab_size": 50, "dim": 12, "heads": 2, "ff_dim": 12}))
        (unit,) = build_units("bp", model, 4, checkpoint=checkpoint)
        batch = model.example_batch(8, 4) if model_name == "transformer" else {"features": torch.randn(8, *shape), "labels": torch.arange(8) % 4}
        saved = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            loss = unit.local_losses(unit.forward_train(batch))["predictor/ce"]
        loss.backward()
        runs[checkpoint] = (loss.detach(), {n: p.grad.clone() for n, p in unit.named_parameters()}, sum(saved))
    (plain_loss, plain_grads, plain_saved), (loss, grads, kept) = runs[False], runs[True]
    assert kept < plain_saved / 2
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_inference_runs_blocks_then_predictor() -> None:
    model, units = units_with_optimizers("scpl")
    model.eval()
    x, _ = batch()
    h = {"features": x}
    with torch.no_grad():
        for unit in units:
            unit.eval()
            h = unit.infer(h)
        assert torch.equal(h["scores"], model(x))


@pytest.mark.parametrize(("builder", "name", "valid"), [(build_model, "resnet99", ", ".join(MODELS.names())), (build_units, "magic", ", ".join(METHODS.names()))])
def test_unknown_names_list_valid_ones(builder, name, valid) -> None:
    with pytest.raises(UnknownNameError, match=valid):
        builder(name, small_vgg(), 10) if builder is build_units else builder(name, (1, 28, 28), 10)


def test_bad_method_options_are_named() -> None:
    with pytest.raises(ValueError, match="i, l, m"):
        build_units("scpl", small_vgg(), 10, projector="x")
    with pytest.raises(ValueError, match="paper, standard"):
        build_units("scpl", small_vgg(), 10, variant="khosla")
    with pytest.raises(ValueError, match="method 'scpl' has no option 'temprature'; valid options: projector, pool, .*temperature"):
        build_units("scpl", small_vgg(), 10, temprature=0.5)
    with pytest.raises(ValueError, match="early-exit classifier 'i'; valid classifiers: l, m"):
        build_units("early_exit", small_vgg(), 10, classifier="i")


def test_bad_model_and_engine_options_are_named() -> None:
    """The same one-line check for every registry's builders, not only methods'."""
    from scpl_kit.engines import build_engine

    with pytest.raises(ValueError, match="model 'vgg' has no option 'widht'; valid options: width, predictor_hidden"):
        build_model("vgg", (1, 28, 28), 10, widht=0.5)
    with pytest.raises(ValueError, match="engine 'sequential' has no option 'devic'; valid options: device"):
        build_engine("sequential", devic="cpu")


def test_al_flat_bridge_reads_the_map_before_resnets_global_pooling() -> None:
    """bridge_input=flat (the SCPL authors' AL): the last ResNet block's bridge sees its 128·4·4 map
    before the pooling, flattened; the other blocks' bridges are unchanged."""
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10, width=0.25)
    units = build_units("al", model, 10, bridge_input="flat", bridge_hidden=16, code_dim=8)
    assert [u.bridge[1][0].in_features for u in units] == [16384, 8192, 4096, 128 * 4 * 4]
    h = {"features": torch.randn(4, 3, 32, 32), "labels": torch.arange(4)}
    for unit in units[:-1]:
        h = unit.forward_train(h).handoff()
    last = units[-1]
    step_ = last.forward_train(h)
    *trunk, final = list(last.body)
    x = h["features"]
    for layer in trunk:
        x = layer(x)
    feature_map = final[0](x)  # the last layer: BasicBlock → global pooling → flatten
    assert step_.outputs["features"].shape == (4, 128)  # what the block hands on is still pooled
    expected = F.mse_loss(last.bridge(feature_map.flatten(1)), step_.outputs["code"].detach())
    torch.testing.assert_close(last.local_losses(step_)["block4/bridge_mse"], expected)


def test_al_text_variant_is_the_al_authors_text_layers() -> None:
    """variant=text: bridge Linear + Tanh to the code, Tanh label encoders, a linear inverse, and the
    first block's inverse (Linear + Tanh) trained with cross-entropy on the labels."""
    torch.manual_seed(0)
    model = build_model("lstm", (12,), 4, vocab_size=50, dim=8)
    units = build_units("al", model, 4, variant="text", code_dim=6)
    first, second = units[0], units[1]
    assert [type(m).__name__ for m in first.bridge] == ["Flatten", "Linear", "Tanh"] and first.bridge[1].out_features == 6
    assert [type(m).__name__ for m in first.inverse] == ["Linear", "Tanh"] and type(second.inverse).__name__ == "Linear"
    ids = torch.randint(2, 50, (5, 12))
    y = torch.tensor([0, 1, 2, 3, 0])
    step_ = first.forward_train({"features": ids, "lengths": torch.full((5,), 12), "labels": y})
    losses = first.local_losses(step_)
    t1 = torch.tanh(F.linear(F.one_hot(y, 4).float(), first.label_encoder[0].weight, first.label_encoder[0].bias))
    torch.testing.assert_close(losses["block1/inverse_ce"], F.cross_entropy(first.inverse(t1), y))
    torch.testing.assert_close(losses["block1/bridge_mse"], F.mse_loss(first.bridge(step_.outputs["summary"]), t1))
