import math

import pytest
import torch

from scpl_kit.methods.losses import supcon_loss


def naive_supcon(features: torch.Tensor, labels: torch.Tensor, temperature: float, variant: str) -> float:
    """Loop-by-loop SupCon straight from the definition (methods.md §2), in float64."""
    z = torch.nn.functional.normalize(features.double().flatten(1), dim=1)
    n = len(labels)
    scores = []
    for i in range(n):
        denominator = sum(math.exp(float(z[i] @ z[j]) / temperature) for j in range(n) if j != i)
        positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
        total = sum(float(z[i] @ z[j]) / temperature - math.log(denominator) for j in positives)
        if variant == "paper":
            scores.append(total / (len(positives) + 1))  # the released code counts the anchor too
        elif positives:
            scores.append(total / len(positives))
    return -sum(scores) / len(scores)


@pytest.mark.parametrize("variant", ["paper", "standard"])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supcon_matches_naive_loop(variant: str, temperature: float) -> None:
    torch.manual_seed(0)
    features = torch.randn(12, 3, 2, 2)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4])  # class 4 has no positive
    got = supcon_loss(features, labels, temperature, variant).item()
    assert got == pytest.approx(naive_supcon(features, labels, temperature, variant), rel=1e-5)


def test_variants_differ_and_standard_is_larger() -> None:
    torch.manual_seed(1)
    features, labels = torch.randn(16, 8), torch.randint(0, 3, (16,))
    paper, standard = (supcon_loss(features, labels, 0.1, v).item() for v in ("paper", "standard"))
    assert standard > paper > 0  # dividing the same negative sum by one more makes the paper loss smaller


def test_supcon_is_stable_at_low_temperature() -> None:
    features, labels = torch.randn(8, 4) * 100, torch.tensor([0, 1] * 4)
    assert torch.isfinite(supcon_loss(features, labels, 0.01))


def test_unknown_variant_names_valid_ones() -> None:
    with pytest.raises(ValueError, match="paper, standard"):
        supcon_loss(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), 0.1, "other")  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["paper", "standard"])
def test_a_batch_without_positive_pairs_gives_a_finite_loss_and_zero_gradient_under_standard(variant: str) -> None:
    """Every label distinct: `standard` has no anchor with a positive (its mean would be 0/0 = NaN);
    it returns 0 with a zero gradient, so a training step goes on. `paper` divides by counts that
    include the anchor, so it is 0 too."""
    features = torch.randn(6, 8, requires_grad=True)
    loss = supcon_loss(features, torch.arange(6), 0.1, variant)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert features.grad is not None and torch.all(features.grad == 0)
