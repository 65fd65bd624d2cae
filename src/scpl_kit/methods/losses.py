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
