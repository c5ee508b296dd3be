"""WILDCAT pooling: class-wise modality averaging and spatial top-k pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def get_k(k: float | int, n: int) -> int:
    """Number of spatial positions selected from a map of ``n`` positions.

    ``k <= 0`` selects none; a float in ``(0, 1)`` is a fraction of ``n`` (Python's
    round-half-to-even, never below 1); the float ``1.0`` selects all positions while the
    integer ``1`` selects one; any other value is a count capped at ``n``.
    """
    if k <= 0:
        return 0
    if isinstance(k, float) and k < 1:
        return max(1, round(k * n))
    if isinstance(k, float) and k == 1:
        return n
    return min(int(k), n)


class ClassWisePool(nn.Module):
    """Average ``M`` consecutive channels per class: ``B x (C*M) x h x w -> B x C x h x w``."""

    def __init__(self, num_modalities: int) -> None:
        super().__init__()
        self.num_modalities = num_modalities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if channels % self.num_modalities:
            raise ValueError(
                f"{channels} channels are not divisible by {self.num_modalities} modalities"
            )
        grouped = x.view(batch, channels // self.num_modalities, self.num_modalities, height, width)
        return grouped.mean(dim=2)


class WildcatPool2d(nn.Module):
    """Spatial pooling of class maps into class scores: mean of the ``k+`` highest values.

    In training mode, inverted dropout is applied to the whole sorted vector before selection.
    ``apply_min_term`` enables the corrected WILDCAT score ``(top + alpha * bottom) / 2``; it is
    off by default, matching the published method where the minimum term has no effect.
    """

    def __init__(
        self, kmax: float, kmin: float, alpha: float, dropout: float, apply_min_term: bool = False
    ) -> None:
        super().__init__()
        self.kmax = kmax
        self.kmin = kmin
        self.alpha = alpha
        self.dropout = dropout
        self.apply_min_term = apply_min_term

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        batch, classes, height, width = maps.shape
        n = height * width
        flat = maps.reshape(batch, classes, n)
        k_max = get_k(self.kmax, n)
        k_min = get_k(self.kmin, n)
        use_min = self.apply_min_term and k_min > 0 and self.alpha != 0
        if self.training and self.dropout > 0:
            ordered, _ = torch.sort(flat, dim=2, descending=True)
            ordered = F.dropout(ordered, p=self.dropout, training=True)
            top = ordered[:, :, :k_max]
            bottom = ordered[:, :, n - k_min :] if use_min else None
        else:
            top = torch.topk(flat, k_max, dim=2).values
            bottom = torch.topk(flat, k_min, dim=2, largest=False).values if use_min else None
        scores = top.mean(dim=2)
        if use_min:
            scores = (scores + self.alpha * bottom.mean(dim=2)) / 2
        return scores

    def extra_repr(self) -> str:
        return (
            f"kmax={self.kmax}, kmin={self.kmin}, alpha={self.alpha}, dropout={self.dropout}, "
            f"apply_min_term={self.apply_min_term}"
        )
