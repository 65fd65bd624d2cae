"""Supervised contrastive loss (SupCon), the local loss of SCPL."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from scpl_kit.batch_group import spread, whole_batch

Variant = Literal["paper", "standard"]
VARIANTS: tuple[str, ...] = ("paper", "standard")


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, variant: Variant = "paper") -> torch.Tensor:
    """SupCon on L2-normalised `features` [N, D] with integer `labels` [N].

    For anchor i: log p_ij = logit_ij - log Σ_{j'≠i} exp(logit_ij'), logits = z zᵀ / τ.
    The anchor's score is Σ_{positives j≠i} log p_ij divided by
      - `paper`:    the number of same-label samples *including* the anchor (the SCPL code's count),
      - `standard`: the number of positives excluding the anchor (Khosla et al.); anchors with
                    no positive are left out of the mean, since their score is 0/0. When no anchor
                    has one (every label in the batch distinct) the loss is 0 with a zero gradient:
                    the batch holds nothing to pull together, so it adds no gradient instead of
                    turning the weights into NaN (other losses of the step still count).
    Loss = −mean over anchors.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SupCon variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    z = F.normalize(features.flatten(1), dim=1)
    # Under a data-parallel engine this process holds a slice of the batch: its anchors are compared
    # with every sample of the whole batch, and the mean is taken so that the replicas' averaged
    # gradients equal one process's (each process's share of the anchors, times the processes).
    (z_all, labels_all), offset = whole_batch(z, labels)
    logits = z @ z_all.T / temperature
    rows = torch.arange(logits.shape[0], device=logits.device)
    is_self = (rows + offset)[:, None] == torch.arange(logits.shape[1], device=logits.device)[None, :]
    same_label = labels[:, None] == labels_all[None, :]
    positive = same_label & ~is_self
    # logsumexp subtracts the row max internally, which is the stability trick the paper applies by hand.
    log_denominator = torch.logsumexp(logits.masked_fill(is_self, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denominator
    positive_sum = (log_prob * positive).sum(dim=1)
    if variant == "paper":
        return -(positive_sum / same_label.sum(dim=1)).mean()
    count = positive.sum(dim=1)
    has_positive = count > 0
    # The mean over the whole batch's anchors with a positive, as one process would take it.
    global_count = ((labels_all[:, None] == labels_all[None, :]).sum(dim=1) > 1).sum() / spread()
    # Anchors without a positive add 0 (and no gradient); with none in the batch the loss is 0, still
    # attached to the graph. Masks, not `if`/boolean indexing: the host never waits for the GPU here.
    per_anchor = torch.where(has_positive, positive_sum / count.clamp(min=1), 0.0)
    return -per_anchor.sum() / global_count.clamp(min=1)


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """The "adjusted cosine" similarity of PredSim and DeInfoReg (both authors' `similarity_matrix`):
    each sample's feature vector [N, D] centred over its own features, scaled to unit length (ε = 1e-8
    added to the norm), the products of every pair, clamped to [−1, 1]. [N, N]."""
    centred = features - features.mean(dim=1, keepdim=True)
    unit = centred / (1e-8 + centred.norm(dim=1, keepdim=True))
    return (unit @ unit.T).clamp(-1, 1)


def label_similarity(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`similarity_matrix` of the one-hot labels: 1 for a pair of the same class, −1/(C − 1) otherwise."""
    return similarity_matrix(F.one_hot(labels, num_classes).float())


def similarity_matching_loss(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean squared difference between the batch's feature similarities and its label similarities,
    over all N² pairs (PredSim's sim loss, DeInfoReg's invariance term). Under a data-parallel engine
    the whole batch is gathered first, so N processes compute what one process does."""
    (features, labels), _ = whole_batch(features, labels)
    return F.mse_loss(similarity_matrix(features), label_similarity(labels, num_classes))


def information_regularizer(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """DeInfoReg's three terms on the L2-normalised projection z [N, D] of a block's output (the
    authors' `DeInfoReg` loss, utils.py):
      - variance:   mean_j relu(1 − std_j(z)) / N, std over the batch (unbiased, + 1e-7 under the root);
      - invariance: `similarity_matching_loss` of z against the labels;
      - covariance: Σ_{i≠j} C_ij² / D with C = (z − z̄)ᵀ(z − z̄) / N.
    The /N of the variance and the /N (not N − 1) of the covariance are the authors' (their weights are all 1)."""
    (features, labels), _ = whole_batch(features, labels)
    z = F.normalize(features.flatten(1), dim=1)
    n, d = z.shape
    centred = z - z.mean(dim=0)
    covariance = centred.T @ centred / n
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    std = torch.sqrt(z.var(dim=0) + 1e-7)
    return {
        "variance": F.relu(1 - std).mean() / n,
        "invariance": F.mse_loss(similarity_matrix(z), label_similarity(labels, num_classes)),
        "covariance": off_diagonal.pow(2).sum() / d,
    }
