"""PredSim, AugLocal and DeInfoReg: each loss against a loop written out here, AugLocal's choice of
layers against its authors' rule and worked examples, and a short run of each that learns."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from scpl_kit.engines.sequential import SequentialEngine
from scpl_kit.methods import build_units
from scpl_kit.methods.auglocal import module_depths, sampled_layers
from scpl_kit.methods.losses import information_regularizer, label_similarity, similarity_matrix
from scpl_kit.methods.predsim import decoder_pool
from scpl_kit.models import build_model
from scpl_kit.models.resnet import BasicBlock
from scpl_kit.updater import OptimizerSettings, UpdateRecipe

from test_methods import tiny_batch

NEW = ["predsim", "auglocal", "deinforeg"]


def similarity_by_loop(rows: torch.Tensor) -> torch.Tensor:
    """Pairwise "adjusted cosine" written out: centre each row over its own entries, divide by its norm
    (+ 1e-8), dot every pair, clip to [−1, 1]."""
    n = len(rows)
    unit = []
    for row in rows.tolist():
        mean = sum(row) / len(row)
        centred = [v - mean for v in row]
        norm = math.sqrt(sum(v * v for v in centred))
        unit.append([v / (1e-8 + norm) for v in centred])
    out = torch.empty(n, n, dtype=torch.float64)
    for i, j in itertools.product(range(n), range(n)):
        out[i, j] = min(1.0, max(-1.0, sum(a * b for a, b in zip(unit[i], unit[j]))))
    return out


def test_similarity_matrices_against_a_loop() -> None:
    torch.manual_seed(0)
    rows = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(similarity_matrix(rows), similarity_by_loop(rows))
    labels = torch.tensor([0, 1, 1, 3, 0])
    expected = torch.tensor([[1.0 if a == b else -1 / 3 for b in labels.tolist()] for a in labels.tolist()])
    torch.testing.assert_close(label_similarity(labels, 4), expected, atol=1e-6, rtol=0)


def test_predsim_loss_against_a_computation_written_out() -> None:
    """(1 − β)·CE of the zero-started classifier on the pooled map + β·mean over pairs of (S(std over space
    of conv(h)) − S(onehot))², with the head's own conv."""
    torch.manual_seed(0)
    model = build_model("vgg", (1, 16, 16), 4, width=0.0625, predictor_hidden=32)
    unit = build_units("predsim", model, 4, modules=2, beta=0.7)[0]
    x, y = tiny_batch(8)
    h = unit.body(x)
    head = unit.head
    losses = unit.local_losses(unit.forward_train({"features": x, "labels": y}))
    conv = head.similarity_map(h).detach().double()
    stds = torch.tensor([[statistics_std(conv[i, c].flatten().tolist()) for c in range(conv.shape[1])] for i in range(len(x))])
    feature_sim, label_sim = similarity_by_loop(stds), similarity_by_loop(F.one_hot(y, 4).double())
    sim = sum((feature_sim[i, j] - label_sim[i, j]) ** 2 for i, j in itertools.product(range(8), range(8))) / 64
    pred = F.cross_entropy(torch.zeros(8, 4) + head.classifier[1].bias, y)  # zero weights at the start: the bias alone
    assert losses["block1/sim"].item() == pytest.approx(0.7 * float(sim), rel=1e-4)
    assert losses["block1/pred"].item() == pytest.approx(0.3 * pred.item(), rel=1e-5)


def statistics_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_predsim_pools_the_classifiers_input_as_the_authors_do() -> None:
    """Their VGG8b on CIFAR-10 at dim-in-decoder 2048: (channels, side) → pooled (height, width), worked
    out from their rule (train.py's LocalLossBlockConv); MNIST at 1024."""
    cifar = {(128, 32): (4, 4), (256, 32): (2, 4), (256, 16): (2, 4), (512, 16): (2, 2), (512, 8): (2, 2), (512, 4): (2, 2)}
    for (channels, side), pooled in cifar.items():
        assert decoder_pool(channels, side, 2048) == pooled
    mnist = {(128, 28): (2, 4), (256, 28): (2, 2), (256, 14): (2, 2), (512, 14): (1, 2), (512, 7): (1, 2), (512, 3): (1, 2)}
    for (channels, side), pooled in mnist.items():
        assert decoder_pool(channels, side, 1024) == pooled
    assert decoder_pool(8, 4, 2048) == (4, 4)  # small enough already: no pooling


def test_deinforeg_terms_against_loops() -> None:
    torch.manual_seed(0)
    z_raw = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 1])
    terms = information_regularizer(z_raw, labels, 3)
    z = (z_raw / z_raw.norm(dim=1, keepdim=True)).tolist()
    n, d = 6, 4
    means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
    variance = 0.0
    for j in range(d):
        var = sum((z[i][j] - means[j]) ** 2 for i in range(n)) / (n - 1)
        variance += max(0.0, 1 - math.sqrt(var + 1e-7)) / (d * n)
    covariance = 0.0
    for a, b in itertools.product(range(d), range(d)):
        if a != b:
            c = sum((z[i][a] - means[a]) * (z[i][b] - means[b]) for i in range(n)) / n
            covariance += c * c / d
    target = torch.tensor([[1.0 if p == q else -0.5 for q in labels.tolist()] for p in labels.tolist()], dtype=torch.float64)
    similarity = similarity_by_loop(torch.tensor(z, dtype=torch.float64))
    invariance = sum((target[i, j] - similarity[i, j]) ** 2 for i, j in itertools.product(range(n), range(n))) / n**2
    assert terms["variance"].item() == pytest.approx(variance, rel=1e-9)
    assert terms["covariance"].item() == pytest.approx(covariance, rel=1e-9)
    assert terms["invariance"].item() == pytest.approx(float(invariance), rel=1e-6)


def test_deinforeg_losses_are_the_regulariser_terms_and_a_thousandth_of_the_cross_entropy() -> None:
    torch.manual_seed(0)
    model = build_model("vgg", (1, 16, 16), 4, width=0.0625, predictor_hidden=32)
    units = build_units("deinforeg", model, 4, modules=2, projector_dim=16)
    x, y = tiny_batch(8)
    losses = units[0].local_losses(units[0].forward_train({"features": x, "labels": y}))
    assert set(losses) == {"block1/variance", "block1/invariance", "block1/covariance", "block1/ce"}
    head = units[0].head
    z = head.projector(units[0].body(x))
    assert losses["block1/ce"].item() == pytest.approx(0.001 * F.cross_entropy(head.classifier(z), y).item(), rel=1e-5)
    # The last block's classifier is the answer; the model's predictor is nobody's.
    assert units[-1].head_answers and all(unit.predictor is None for unit in units)


# -- AugLocal's auxiliary networks ----------------------------------------------------------------

# The authors' worked examples, ResNet-32 (16 layers: the stem, then 5 BasicBlocks at 16, 32, 64 channels):
# their --local_module_num 16 with --aux_net_depth d trains 16 − d modules, one layer each but the last.
RESNET32_D2 = [[8, 15], [8, 15], [8, 15], [9, 15], [10, 15], [10, 15], [10, 15], [11, 15], [12, 15], [12, 15], [12, 15], [13, 15], [14, 15]]
RESNET32_D3 = [[5, 10, 15], [6, 10, 15], [6, 11, 15], [7, 11, 15], [8, 11, 15], [8, 12, 15], [10, 15], [11, 15], [12, 15], [12, 15], [12, 15], [13, 15]]


def test_auglocal_samples_the_layers_the_authors_rule_gives() -> None:
    """d_j = max(1, round(d − γ(d − 1)·j/(K − 2))) and layers round(j + (n − j − 1)/d_j·i), i = 1..d_j: checked
    on the authors' settings (d = 2, 3 and 5 on ResNet-32, γ = 0.5) against the tables their code gives."""
    assert module_depths(2, 14, 0.5) == [2] * 13
    assert module_depths(3, 13, 0.5) == [3] * 6 + [2] * 6
    assert module_depths(5, 11, 0.5) == [5, 5, 5, 4, 4, 4, 4, 3, 3, 3]
    assert [sampled_layers(j, 16, d) for j, d in enumerate(module_depths(2, 14, 0.5))] == RESNET32_D2
    assert [sampled_layers(j, 16, d) for j, d in enumerate(module_depths(3, 13, 0.5))] == RESNET32_D3
    assert sampled_layers(13, 16, 3) == [14, 15]  # fewer layers left than the depth: all of them


def by_rule(j: int, n: int, d: int) -> list[int]:
    """The rule as the paper states it, written out: d layers spaced evenly after layer j, the last one last."""
    if d >= n - 1 - j:
        return list(range(j + 1, n))
    step = (n - j - 1) / d
    picks = []
    for i in range(1, d + 1):
        exact = j + step * i
        low = math.floor(exact)
        # Python's round: halves go to the even neighbour
        picks.append(low + 1 if exact - low > 0.5 or (exact - low == 0.5 and low % 2 == 1) else low)
    return picks


@pytest.mark.parametrize("n", [16, 55])
def test_auglocal_sampling_matches_the_rule_written_out_everywhere(n: int) -> None:
    for j, d in itertools.product(range(n - 1), range(1, 6)):
        assert sampled_layers(j, n, d) == by_rule(j, n, d), (j, d)


def test_auglocal_builds_new_blocks_at_the_sampled_layers_widths() -> None:
    """ResNet-32 cut as the authors' K = 16, d = 2 run cuts it (13 one-layer modules, then layers 13-15): module 1's aux net copies layers 8 and 15 (32 and 64 channels), each
    doubling of the width a stride-2 block; module 13's two 64-channel blocks keep the side. Fresh weights,
    a BatchNorm1d only for depth 1."""
    torch.manual_seed(0)
    model = build_model("resnet32", (3, 32, 32), 10)
    units = build_units("auglocal", model, 10, modules=14, cuts=list(range(1, 14)), depth=2)
    assert len(units) == 14 and units[-1].head is None and units[-1].predictor is model.predictor
    first = [m for m in units[0].head.classifier if isinstance(m, BasicBlock)]
    assert [(b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0]) for b in first] == [(16, 32, 2), (32, 64, 2)]
    twelfth = [m for m in units[12].head.classifier if isinstance(m, BasicBlock)]
    assert [(b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0]) for b in twelfth] == [(64, 64, 1), (64, 64, 1)]
    primary = {id(p) for p in model.parameters()}
    assert not any(id(p) in primary for p in units[0].head.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in units[0].head.classifier)
    shallow = build_units("auglocal", build_model("resnet32", (3, 32, 32), 10), 10, modules=4, depth=1)
    assert isinstance(shallow[0].head.classifier[-2], torch.nn.BatchNorm1d)


# -- a short run learns -------------------------------------------------------------------------

@pytest.mark.parametrize("method", NEW)
def test_a_short_run_learns_well_above_chance(method: str) -> None:
    """10 epochs of three 32-image batches of four classes: the model's answer is right for most images
    it has not seen (chance: a quarter)."""
    torch.manual_seed(0)
    model = build_model("vgg", (1, 16, 16), 4, width=0.0625, predictor_hidden=32)
    units = build_units(method, model, 4, modules=2, **({"projector_dim": 32} if method == "deinforeg" else {}))
    engine = SequentialEngine("cpu")
    engine.setup(units, recipe=UpdateRecipe(OptimizerSettings(lr=3e-3, lr_min=3e-3), steps_per_epoch=3, epochs=10))
    x, y = tiny_batch(128)
    train = [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(3)]
    for _ in range(10):
        engine.train_epoch(train)
    unseen = (x[96:], y[96:])
    accuracy = (engine.predict([unseen])["scores"].argmax(1) == unseen[1]).float().mean().item()
    assert accuracy >= 0.75, accuracy
