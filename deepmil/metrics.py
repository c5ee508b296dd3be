"""Evaluation metrics: predicted mask back to the ground-truth geometry, F1+/F1-, errors.

All tensor functions are vectorised and run on the device of their inputs.
Conventions:
* F1+ is the Dice of the binary foreground sets, F1- the Dice of their complements.
* A Dice of two empty sets is defined as 1 (otherwise 0/0), so an empty prediction on an empty
  ground truth gives F1+ = 1 and a full prediction on a full ground truth gives F1- = 1.
* Set-level F1 values are means of per-image values (not pooled pixels).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

Size = tuple[int, int]


def _crop_start(src: int, dst: int, exact: bool) -> int:
    """First index of a centred window of length ``dst`` in a dimension of length ``src``.

    Faithful (upstream) start is ``src // 2 - dst // 2``; the exact inverse of a padding that put
    ``(src - dst) // 2`` elements before is ``(src - dst) // 2``. They differ by one when ``dst``
    is odd and ``src`` even.
    """
    if exact:
        return (src - dst) // 2
    return src // 2 - dst // 2


def center_crop(mask: torch.Tensor, size: Size, exact: bool = False) -> torch.Tensor:
    """Centre-crop the last two dimensions of ``mask`` to ``size = (h, w)``."""
    src_h, src_w = mask.shape[-2:]
    h, w = size
    if h > src_h or w > src_w:
        raise ValueError(f"cannot crop a mask of size {(src_h, src_w)} to the larger size {size}")
    top = _crop_start(src_h, h, exact)
    left = _crop_start(src_w, w, exact)
    return mask[..., top:top + h, left:left + w]


def resize_bilinear(mask: torch.Tensor, size: Size) -> torch.Tensor:
    """Resize the last two dimensions of a float mask (bilinear, ``align_corners=True``)."""
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:])
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=True)
    return out.reshape(*lead, *size)


def restore_mask_geometry(mask: torch.Tensor, padded_hw: Size, upscaled_hw: Size,
                          original_hw: Size, exact: bool = False) -> torch.Tensor:
    """Map a mask predicted on the padded evaluation input back to the ground-truth geometry.

    ``mask`` has shape ``(..., h_p, w_p)`` (e.g. ``1 x h_p x w_p``). When the image was upscaled
    (CUB/OxF) the mask is centre-cropped to ``upscaled_hw`` and resized to ``original_hw``
    (bilinear, ``align_corners=True``); any remaining mismatch (GlaS) is removed by a centre crop
    to ``original_hw``. ``exact=False`` reproduces the upstream crop (one pixel late for odd
    sizes); ``exact=True`` is the exact inverse of the evaluation padding. Leading dimensions are
    kept.
    """
    padded_hw, upscaled_hw, original_hw = tuple(padded_hw), tuple(upscaled_hw), tuple(original_hw)
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != padded_hw:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not end with padded size "
                         f"{padded_hw}")
    out = mask if mask.is_floating_point() else mask.float()
    if upscaled_hw != original_hw:
        out = resize_bilinear(center_crop(out, upscaled_hw, exact), original_hw)
    if tuple(out.shape[-2:]) != original_hw:
        out = center_crop(out, original_hw, exact)
    return out


def dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Dice ``2|P n G| / (|P| + |G|)`` over the last two dimensions.

    Inputs are binary (bool or {0, 1}; any non-zero value counts as foreground) and of equal
    shape. Returns a float64 tensor of shape ``pred.shape[:-2]``; two empty sets give 1.
    """
    if pred.shape != target.shape or pred.dim() < 2:
        raise ValueError(f"dice needs two masks of equal shape (>= 2 dims), got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    p = (pred != 0).to(torch.float64)
    t = (target != 0).to(torch.float64)
    inter = (p * t).sum(dim=(-2, -1))
    total = p.sum(dim=(-2, -1)) + t.sum(dim=(-2, -1))
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def f1_pos_neg(pred_mask_continuous: torch.Tensor, gt_mask: torch.Tensor,
               threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (F1+, F1-): prediction binarised ``>= threshold``, ground truth ``>= 0.5``.

    F1+ is the Dice of the foregrounds, F1- the Dice of the backgrounds (complements).
    """
    pred = pred_mask_continuous >= threshold
    gt = gt_mask >= 0.5
    return dice(pred, gt), dice(~pred, ~gt)


def all_ones_f1(gt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (F1+, F1-) of a prediction covering the whole image.

    F1+ = ``2 fg / (fg + N)`` with ``N`` pixels, F1- = 0 (1 only for an all-foreground ground
    truth, by the empty-set convention). A baseline to read F1+ values against.
    """
    return f1_pos_neg(torch.ones_like(gt_mask, dtype=torch.float32), gt_mask)


def _flat_labels(values: torch.Tensor | Sequence[int], name: str) -> torch.Tensor:
    labels = torch.as_tensor(values).flatten()
    if labels.is_floating_point():
        raise ValueError(f"{name} must hold integer labels, got dtype {labels.dtype}")
    return labels


def classification_error(pred_labels: torch.Tensor | Sequence[int],
                         labels: torch.Tensor | Sequence[int]) -> float:
    """Percentage of predictions that differ from the true labels."""
    pred = _flat_labels(pred_labels, "pred_labels")
    true = _flat_labels(labels, "labels").to(pred.device)
    if pred.numel() != true.numel() or pred.numel() == 0:
        raise ValueError(f"classification_error needs two non-empty label sets of equal size, got "
                         f"{pred.numel()} and {true.numel()}")
    return 100.0 * (pred != true).double().mean().item()


def confusion_matrix(pred: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int],
                     num_classes: int) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts; entry ``[i, j]`` = true class i predicted j."""
    p = _flat_labels(pred, "pred")
    t = _flat_labels(labels, "labels").to(p.device)
    if p.numel() != t.numel():
        raise ValueError(f"confusion_matrix: {p.numel()} predictions for {t.numel()} labels")
    for name, values in (("pred", p), ("labels", t)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {name} outside [0, {num_classes}): "
                             f"{values.min().item()}..{values.max().item()}")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class LocalizationMeter:
    """Accumulates per-image results of one evaluation pass and averages them per image."""

    def __init__(self) -> None:
        self.f1_pos: list[float] = []
        self.f1_neg: list[float] = []
        self.correct: list[bool] = []
        self.f1_pos_all_ones: list[float] = []
        self.losses: dict[str, list[float]] = {}

    def update(self, f1_pos: float, f1_neg: float, correct: bool,
               losses: Mapping[str, float] | None = None,
               f1_pos_all_ones: float | None = None) -> None:
        """Record one image: its F1+/F1- (fractions), whether its label was right, its losses
        (e.g. ``{"loss": .., "loss_pos": .., "loss_neg": .., "loss_seg": ..}``) and optionally the
        F1+ of an all-ones prediction."""
        self.f1_pos.append(float(f1_pos))
        self.f1_neg.append(float(f1_neg))
        self.correct.append(bool(correct))
        if f1_pos_all_ones is not None:
            self.f1_pos_all_ones.append(float(f1_pos_all_ones))
        for name, value in (losses or {}).items():
            self.losses.setdefault(name, []).append(float(value))

    @property
    def n_images(self) -> int:
        return len(self.correct)

    def summary(self) -> dict[str, float | int | None]:
        """Per-image means: ``cl_error`` (%), ``f1_pos``/``f1_neg``/``f1_pos_all_ones`` (x100,
        None when never given), one entry per loss name, and ``n_images``."""
        n = self.n_images
        if n == 0:
            raise ValueError("LocalizationMeter.summary: no image was recorded")
        for name, values in [("f1_pos_all_ones", self.f1_pos_all_ones), *self.losses.items()]:
            if values and len(values) != n:
                raise ValueError(f"LocalizationMeter.summary: '{name}' given for {len(values)} "
                                 f"of {n} images")
        out: dict[str, float | int | None] = {
            "cl_error": 100.0 * (n - sum(self.correct)) / n,
            "f1_pos": 100.0 * sum(self.f1_pos) / n,
            "f1_neg": 100.0 * sum(self.f1_neg) / n,
            "f1_pos_all_ones": (100.0 * sum(self.f1_pos_all_ones) / n
                                if self.f1_pos_all_ones else None),
        }
        out.update({name: sum(values) / n for name, values in self.losses.items()})
        out["n_images"] = n
        return out
