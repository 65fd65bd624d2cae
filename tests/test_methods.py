"""Every method on every model: the losses fall, nothing crosses a block where nothing should, and
Associated Learning's loss and inference match computations written out here."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scpl_kit.engines.sequential import SequentialEngine
from scpl_kit.methods import METHODS, build_units
from scpl_kit.methods.units import inference_route
from scpl_kit.models import MODELS, build_model
from scpl_kit.updater import OptimizerSettings, UpdateRecipe
from updates import attach, step

DECOUPLED = [m for m in METHODS.names() if m != "bp"]
SMALL = {
    "vgg": {"width": 0.0625, "predictor_hidden": 32}, "resnet18": {"width": 0.0625}, "resnet32": {"width": 0.25}, "resnet110": {"width": 0.125},
    "lstm": {"dim": 16, "vocab_size": 40}, "transformer": {"dim": 12, "ff_dim": 12, "vocab_size": 40},
}
TEXT_LENGTH = 10
IMAGE_ONLY = {"infopro", "contsup", "auglocal"}  # a decoder, context encoders or auxiliary BasicBlocks over feature maps
OPTIONS = {"scpl": {"projector_hidden": 32, "projector_dim": 16}, "early_exit": {"hidden": 32}, "al": {"bridge_hidden": 64, "code_dim": 32},
           "deinforeg": {"projector_dim": 32}}


def built(method: str, model_name: str = "vgg", classes: int = 4):
    torch.manual_seed(0)
    shape = (TEXT_LENGTH,) if "vocab_size" in SMALL[model_name] else (1, 16, 16)
    model = build_model(model_name, shape, classes, **SMALL[model_name])
    units = build_units(method, model, classes, **OPTIONS.get(method, {}))
    attach(units, 3e-3, 3e-3, 100)
    return model, units


def tiny_batch(n: int = 32, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes a network can learn in a few steps: each class brightens its own quarter of the image."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % classes
    images = 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    for k in range(classes):
        rows, cols = divmod(k, 2)
        images[labels == k, :, rows * 8 : rows * 8 + 8, cols * 8 : cols * 8 + 8] += 1.0
    return images, labels


def tiny_text_batch(n: int = 32, classes: int = 4) -> dict[str, torch.Tensor]:
    """Documents of 3 to 10 tokens (right-padded with 0) whose class shows in which words they use:
    class k draws from ids 2 + 8k … 9 + 8k of a 40-word vocabulary."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % classes
    lengths = torch.randint(3, TEXT_LENGTH + 1, (n,), generator=g)
    tokens = 2 + 8 * labels[:, None] + torch.randint(0, 8, (n, TEXT_LENGTH), generator=g)
    tokens[torch.arange(TEXT_LENGTH)[None, :] >= lengths[:, None]] = 0
    return {"features": tokens, "lengths": lengths, "labels": labels}


@pytest.mark.parametrize("model_name", MODELS.names())
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_learns_on_every_model(method: str, model_name: str) -> None:
    if method in IMAGE_ONLY and "vocab_size" in SMALL[model_name]:
        with pytest.raises(ValueError, match=f"method {method} needs an image model"):
            built(method, model_name)
        return
    _, units = built(method, model_name)
    engine = SequentialEngine("cpu")
    engine.setup(units, recipe=UpdateRecipe(OptimizerSettings(lr=3e-3, lr_min=3e-3), steps_per_epoch=1, epochs=16))
    batches = [tiny_text_batch() if "vocab_size" in SMALL[model_name] else tiny_batch()]
    first = engine.train_epoch(batches)
    for _ in range(15):
        last = engine.train_epoch(batches)
    assert set(first) == set(last) and first
    assert sum(last.values()) < sum(first.values()), (first, last)
    readouts = engine.predict(batches)
    assert readouts["scores"].shape == (32, 4)


@pytest.mark.parametrize("method", DECOUPLED)
def test_no_gradient_crosses_a_block(method: str) -> None:
    """Block 1's gradients after its own step are unchanged by block 2's backward, and everything
    it hands on arrives detached."""
    _, units = built(method)
    x, y = tiny_batch()
    handed, _ = step(units[0], {"features": x, "labels": y})
    assert handed and not any(t.requires_grad for t in handed.values())
    before = [p.grad.clone() for p in units[0].parameters() if p.grad is not None]
    step(units[1], handed)
    after = [p.grad for p in units[0].parameters() if p.grad is not None]
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


def test_associated_learning_loss_matches_the_formula() -> None:
    """MSE(b_k(f_k(x_k)), t_k) + MSE(h_k(t_k), t_{k-1}) with t_0 = onehot(y) and t_k = g_k(t_{k-1}),
    recomputed here from the unit's parts, for the first two blocks."""
    _, units = built("al")
    x, y = tiny_batch()
    signal = {"features": x, "labels": y}
    t_prev, h = F.one_hot(y, 4).float(), x
    for unit in units[:2]:
        step = unit.forward_train(signal)
        losses = unit.local_losses(step)
        h = unit.body(h)
        t = unit.label_encoder(t_prev)
        expected_bridge = ((unit.bridge(h) - t) ** 2).mean()
        expected_inverse = ((unit.inverse(t) - t_prev) ** 2).mean()
        torch.testing.assert_close(losses[f"{unit.name}/bridge_mse"], expected_bridge)
        torch.testing.assert_close(losses[f"{unit.name}/inverse_mse"], expected_inverse)
        signal, t_prev = step.handoff(), t.detach()
        h = h.detach()


def test_associated_learning_trains_only_what_each_term_should() -> None:
    """The bridge term reaches f_k and b_k but not g_k (its target is stop-gradient); the inverse term
    reaches g_k and h_k but not f_k."""
    _, (unit, *_) = built("al")
    x, y = tiny_batch()
    losses = unit.local_losses(unit.forward_train({"features": x, "labels": y}))
    for term, reached, untouched in (("bridge_mse", (unit.body, unit.bridge), (unit.label_encoder, unit.inverse)),
                                     ("inverse_mse", (unit.label_encoder, unit.inverse), (unit.body, unit.bridge))):
        unit.zero_grad(set_to_none=True)
        losses[f"block1/{term}"].backward(retain_graph=True)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in reached for p in m.parameters() if p.requires_grad), term
        assert all(p.grad is None for m in untouched for p in m.parameters()), term


def test_associated_learning_inference_decodes_back_through_every_block() -> None:
    """scores = h_1(h_2(…h_K(b_K(f_K(…f_1(x)))))): one score per class; block k's exit decodes its own
    bridge through h_k … h_1."""
    _, units = built("al")
    for unit in units:
        unit.eval()
    x, _ = tiny_batch()
    assert inference_route(units) == [(0, "forward"), (1, "forward"), (2, "forward"), (3, "forward"),
                                      (3, "back"), (2, "back"), (1, "back"), (0, "back")]
    engine = SequentialEngine("cpu")
    engine.setup(units)
    readouts = engine.predict([(x, torch.zeros(32, dtype=torch.long))])
    with torch.no_grad():
        features, exits = x, []
        for unit in units:
            features = unit.body(features)
            exits.append(unit.bridge(features))
        decoded = []
        for k, code in enumerate(exits):
            for unit in reversed(units[: k + 1]):
                code = unit.inverse(code)
            decoded.append(code)
    assert readouts["scores"].shape == (32, 4)
    torch.testing.assert_close(readouts["scores"], decoded[-1])
    for k, code in enumerate(decoded):
        torch.testing.assert_close(readouts[f"exit/block{k + 1}"], code)


def test_early_exit_has_an_exit_per_block_and_the_predictor_at_the_end() -> None:
    model, units = built("early_exit")
    engine = SequentialEngine("cpu")
    engine.setup(units)
    x, y = tiny_batch()
    _, losses = step(units[0], {"features": x, "labels": y})
    assert set(losses) == {"block1/ce"}
    readouts = engine.predict([(x, y)])
    assert sorted(readouts) == ["exit/block1", "exit/block2", "exit/block3", "exit/block4", "scores"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(readouts["scores"], model(x))  # the predictor on the last block
        torch.testing.assert_close(readouts["exit/block1"], units[0].head.classifier(model.blocks[0](x)))


@pytest.mark.parametrize("method", DECOUPLED)
def test_a_one_block_model_is_refused_by_decoupled_methods(method: str) -> None:
    model = build_model("vgg", (1, 16, 16), 4, width=0.0625, blocks=[[16, "M"]])
    with pytest.raises(ValueError, match="has 1 block; give it at least 2 layers .* or use method=bp"):
        build_units(method, model, 4)
    two_layers = build_model("vgg", (1, 16, 16), 4, width=0.0625, blocks=[[16, 16, "M"]])
    with pytest.raises(ValueError, match=r"has 1 block; cut it into 2\.\.2 modules \(method.modules\)"):
        build_units(method, two_layers, 4)


def test_no_engine_names_a_method() -> None:
    """Engines know the unit interface only: no string equal to a method's name (no `if method ==
    "al"`), and nothing imported from a method's module."""
    import ast
    from pathlib import Path

    import scpl_kit.engines

    for path in Path(scpl_kit.engines.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not names & set(METHODS.names()), f"{path.name} names a method"
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert {m for m in imported if m.startswith("scpl_kit.methods")} <= {"scpl_kit.methods.units"}, path.name


def test_no_engine_imports_another_engine() -> None:
    """Engines share mechanisms kept below them (balance, replicas, staged, transport, distributed),
    never one another: no registered engine's module imports another's, nor reads a unit's insides
    (`.body`, `.head`: a network to cut into stages comes through `LocalUnit.network()`)."""
    import ast
    import inspect

    from scpl_kit.engines import ENGINES

    modules = {inspect.getmodule(ENGINES.get(name)).__name__ for name in ENGINES.names()}
    for module in modules:
        tree = ast.parse(Path(inspect.getfile(__import__(module, fromlist=["_"]))).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & (modules - {module}), module
        attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not attributes & {"body", "head"}, module


def test_only_the_updater_builds_or_steps_an_optimizer() -> None:
    """The update step is the engine's, through scpl_kit.updater: no method or engine module names
    torch.optim or calls an optimizer's or scheduler's step (gpipe's stage timing runs a backward on
    copies, which steps nothing)."""
    import ast
    from pathlib import Path

    import scpl_kit.engines
    import scpl_kit.methods

    for package in (scpl_kit.methods, scpl_kit.engines):
        for path in Path(package.__file__).parent.glob("*.py"):
            tree = ast.parse(path.read_text())
            attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
            assert "optim" not in attributes, path.name
            calls = [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]
            assert not [c for c in calls if c.endswith(("optimizer.step", "scheduler.step", "optimizer.zero_grad"))], path.name
