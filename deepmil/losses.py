"""The three terms of the min-max entropy objective, and the baselines' classification loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def localizer_loss(
    seg_scores: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``L_seg``: cross-entropy of the localizer head's scores."""
    return F.cross_entropy(seg_scores, labels, reduction=reduction)


def positive_loss(
    pos_scores: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``L_pos``: cross-entropy of the positive region, low conditional entropy for ``y``."""
    return F.cross_entropy(pos_scores, labels, reduction=reduction)


def negative_loss(neg_scores: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``L_neg``: cross-entropy of the negative region against the uniform distribution.

    ``-(1/B) sum_b (1/C) sum_c log p(c | X-_b)``; equals ``log C`` exactly when the prediction is
    uniform and is larger otherwise, which pushes the negative region to maximum entropy.
    ``reduction="none"`` gives the per-sample terms.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"negative_loss: reduction {reduction!r} is not 'mean' or 'none'")
    per_sample = -torch.log_softmax(neg_scores, dim=1).mean(dim=1)
    return per_sample if reduction == "none" else per_sample.mean()


def classifier_loss(
    scores: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``L_cl``: cross-entropy of a baseline network's class scores."""
    return F.cross_entropy(scores, labels, reduction=reduction)
