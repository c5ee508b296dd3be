"""Evaluation metrics: predicted mask back to the ground-truth geometry, F1+/F1-, IoU, PxAP,
threshold sweeps, errors, and CRF refinement of a stream of masks in worker processes.

All tensor functions are vectorised and run on the device of their inputs.
Conventions:
* F1+ is the Dice of the binary foreground sets, F1- the Dice of their complements.
* A Dice (or IoU) of two empty sets is 0/0; it is defined as 1 by default, so an empty prediction
  on an empty ground truth gives F1+ = 1 and a full prediction on a full ground truth F1- = 1.
  ``empty = 0`` (the setting ``metrics.empty_dice: zero``) gives 0 instead, the rule of
  scikit-learn's ``f1_score(zero_division=0)``.
* Set-level F1 values are means of per-image values (not pooled pixels); PxAP pools pixels.
* Per-image functions return fractions; meter summaries are percentages.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

Size = tuple[int, int]
EMPTY_DICE = {"one": 1.0, "zero": 0.0}


@dataclass(frozen=True)
class MetricSettings:
    """How the localisation metrics are computed: the value of a Dice or IoU of two empty sets
    (``empty``) and the PxAP histogram's bin width (``pxap_interval``)."""

    empty: float = 1.0
    pxap_interval: float = 0.001

    @classmethod
    def from_config(cls, section: Mapping[str, object]) -> MetricSettings:
        """From the ``metrics`` section of a configuration (``empty_dice``,
        ``cam_curve_interval``)."""
        return cls(EMPTY_DICE[str(section["empty_dice"])], float(section["cam_curve_interval"]))


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


def _overlap(pred: torch.Tensor, target: torch.Tensor, name: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(|P n G|, |P|, |G|)`` per image over the last two dimensions, in float64."""
    if pred.shape != target.shape or pred.dim() < 2:
        raise ValueError(f"{name} needs two masks of equal shape (>= 2 dims), got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    p = (pred != 0).to(torch.float64)
    t = (target != 0).to(torch.float64)
    return (p * t).sum(dim=(-2, -1)), p.sum(dim=(-2, -1)), t.sum(dim=(-2, -1))


def dice(pred: torch.Tensor, target: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """Per-image Dice ``2|P n G| / (|P| + |G|)`` over the last two dimensions.

    Inputs are binary (bool or {0, 1}; any non-zero value counts as foreground) and of equal
    shape. Returns a float64 tensor of shape ``pred.shape[:-2]``; two empty sets give ``empty``.
    """
    inter, p_sum, t_sum = _overlap(pred, target, "dice")
    total = p_sum + t_sum
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, empty))


def iou(pred: torch.Tensor, target: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """Per-image IoU (Jaccard) ``|P n G| / |P u G|`` of binary masks over the last two dimensions.

    Same input rules as :func:`dice`; returns float64 of shape ``pred.shape[:-2]``; two empty
    sets give ``empty``.
    """
    inter, p_sum, t_sum = _overlap(pred, target, "iou")
    union = p_sum + t_sum - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, empty))


def f1_pos_neg(pred_mask_continuous: torch.Tensor, gt_mask: torch.Tensor,
               threshold: float = 0.5, empty: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (F1+, F1-): prediction binarised ``>= threshold``, ground truth ``>= 0.5``.

    F1+ is the Dice of the foregrounds, F1- the Dice of the backgrounds (complements); ``empty``
    is the Dice of two empty sets.
    """
    pred = pred_mask_continuous >= threshold
    gt = gt_mask >= 0.5
    return dice(pred, gt, empty), dice(~pred, ~gt, empty)


def all_ones_f1(gt_mask: torch.Tensor, empty: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (F1+, F1-) of a prediction covering the whole image.

    F1+ = ``2 fg / (fg + N)`` with ``N`` pixels, F1- = 0 (``empty`` for an all-foreground ground
    truth, by the empty-set convention). A baseline to read F1+ values against.
    """
    return f1_pos_neg(torch.ones_like(gt_mask, dtype=torch.float32), gt_mask, empty=empty)


def iou_at(pred_mask_continuous: torch.Tensor, gt_mask: torch.Tensor,
           threshold: float = 0.5, empty: float = 1.0) -> torch.Tensor:
    """Per-image IoU of the prediction binarised ``>= threshold`` (ground truth ``>= 0.5``)."""
    return iou(pred_mask_continuous >= threshold, gt_mask >= 0.5, empty)


def top1_localization(correct: torch.Tensor | bool, iou_value: torch.Tensor | float,
                      min_iou: float = 0.5) -> torch.Tensor:
    """Top-1 localisation hit per image: class correct and IoU ``>= min_iou``."""
    return torch.as_tensor(correct, dtype=torch.bool) & (torch.as_tensor(iou_value) >= min_iou)


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
        self.iou: list[float] = []
        self.losses: dict[str, list[float]] = {}

    def update(self, f1_pos: float, f1_neg: float, correct: bool,
               losses: Mapping[str, float] | None = None,
               f1_pos_all_ones: float | None = None, iou: float | None = None) -> None:
        """Record one image: its F1+/F1- (fractions), whether its label was right, its losses
        (e.g. ``{"loss": .., "loss_pos": .., "loss_neg": .., "loss_seg": ..}``) and optionally the
        F1+ of an all-ones prediction and the IoU of the prediction (fraction)."""
        self.f1_pos.append(float(f1_pos))
        self.f1_neg.append(float(f1_neg))
        self.correct.append(bool(correct))
        if f1_pos_all_ones is not None:
            self.f1_pos_all_ones.append(float(f1_pos_all_ones))
        if iou is not None:
            self.iou.append(float(iou))
        for name, value in (losses or {}).items():
            self.losses.setdefault(name, []).append(float(value))

    @property
    def n_images(self) -> int:
        return len(self.correct)

    def summary(self) -> dict[str, float | int | None]:
        """Per-image means: ``cl_error`` (%), ``f1_pos``/``f1_neg``/``f1_pos_all_ones`` (x100,
        None when never given), one entry per loss name, and ``n_images``. When IoUs were given:
        ``iou`` (x100) and ``top1_loc`` (% of images with the right class and IoU >= 0.5)."""
        n = self.n_images
        if n == 0:
            raise ValueError("LocalizationMeter.summary: no image was recorded")
        for name, values in [("f1_pos_all_ones", self.f1_pos_all_ones), ("iou", self.iou),
                             *self.losses.items()]:
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
        if self.iou:
            hits = top1_localization(torch.tensor(self.correct), torch.tensor(self.iou))
            out["iou"] = 100.0 * sum(self.iou) / n
            out["top1_loc"] = 100.0 * hits.double().mean().item()
        out.update({name: sum(values) / n for name, values in self.losses.items()})
        out["n_images"] = n
        return out


def _check_scores(mask: torch.Tensor, gt: torch.Tensor, name: str) -> None:
    if mask.shape != gt.shape or mask.dim() < 2:
        raise ValueError(f"{name}: mask and ground truth need equal shapes (>= 2 dims), got "
                         f"{tuple(mask.shape)} and {tuple(gt.shape)}")
    if mask.numel() and not (mask.min() >= 0 and mask.max() <= 1):
        raise ValueError(f"{name}: mask values must lie in [0, 1], got "
                         f"[{mask.min().item()}, {mask.max().item()}]")


def pxap_bin_edges(interval: float) -> torch.Tensor:
    """Left bin edges of the PxAP score histogram: ``np.arange(0, 1, interval)`` in float64,
    then 1.0, 2.0 and 3.0 (the score 1.0 has a bin of its own), as wsolevaluation's
    ``MaskEvaluator`` with ``cam_curve_interval = interval``."""
    if not 0 < interval < 1:
        raise ValueError(f"PxAP interval must lie in (0, 1), got {interval}")
    return torch.from_numpy(np.append(np.arange(0, 1, interval), [1.0, 2.0, 3.0]))


class PxAPMeter:
    """Pixel-wise average precision over a set (PxAP), equal to wsolevaluation's
    ``MaskEvaluator`` at the same ``interval`` (its ``cam_curve_interval``).

    The continuous scores in [0, 1] of all pixels of all images are counted in the bins of
    :func:`pxap_bin_edges` (``[e_i, e_{i+1})``, as ``np.histogram``), separately for
    ground-truth background (``< 0.5``) and foreground pixels. Going down the thresholds
    ``e_i``, the cumulative counts give TP, FP, precision ``P_i`` and recall ``R_i``, and
    ``AP = sum_i (R_i - R_{i-1}) P_i`` over the thresholds where ``P_i`` is defined.
    ``counts`` (2 x bins, int64: background row, foreground row) is the whole state; meters
    of shards add up.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.edges = pxap_bin_edges(interval)
        self.counts = torch.zeros(2, len(self.edges) - 1, dtype=torch.int64)

    @property
    def bins(self) -> int:
        """The number of histogram bins (the regular ones, 1.0's and an always empty one)."""
        return self.counts.shape[1]

    def update(self, mask: torch.Tensor, gt: torch.Tensor) -> None:
        """Count the pixels of a continuous mask and its ground truth (equal shapes)."""
        _check_scores(mask, gt, "PxAPMeter.update")
        scores = mask.detach().to(torch.float64).flatten()
        index = torch.searchsorted(self.edges.to(scores.device), scores, right=True) - 1
        index = index + self.bins * (gt >= 0.5).flatten().long()
        counts = torch.bincount(index, minlength=2 * self.bins)
        self.counts += counts.reshape(2, self.bins).cpu()

    def curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(precision, recall)`` at the thresholds in decreasing order, float64 fractions;
        precision is NaN where no pixel is predicted foreground."""
        negatives, positives = self.counts.flip(-1).cumsum(-1).double()
        if positives[-1] == 0:
            raise ValueError("PxAPMeter: no ground-truth foreground pixel was recorded")
        return positives / (positives + negatives), positives / positives[-1]

    def compute(self) -> float:
        """PxAP in percent."""
        precision, recall = self.curve()
        terms = precision[1:] * torch.diff(recall)
        return 100.0 * terms[~terms.isnan()].sum().item()

    def coarse_counts(self, bins: int) -> torch.Tensor:
        """The counts merged into ``bins`` equal bins of [0, 1] (2 x bins; 1.0 in the last)."""
        left = torch.floor(self.edges[:-1] * bins + 1e-9).long().clamp_(max=bins - 1)
        coarse = torch.zeros(2, bins, dtype=torch.int64)
        return coarse.index_add_(1, left, self.counts)


def _count_at_least(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Per row of ``values`` (n x m), the number of entries ``>= t`` for each threshold."""
    ordered = values.sort(dim=-1).values
    below = torch.searchsorted(ordered, thresholds.repeat(len(values), 1), side="left")
    return values.shape[-1] - below


class ThresholdSweepMeter:
    """Per-image F1+ (Dice), F1- and IoU at the thresholds 0.00, 0.01, ..., 1.00, summed over
    images (prediction ``mask >= t`` compared in the mask's dtype, ground truth ``>= 0.5``,
    empty-set value ``empty`` as in :func:`dice` and :func:`iou`). ``sums`` (3 x 101 float64:
    F1+, F1-, IoU) and ``n_images`` are the whole state; meters of shards add up."""

    METRICS = ("f1_pos", "f1_neg", "iou")

    def __init__(self, steps: int = 100, empty: float = 1.0) -> None:
        self.empty = empty
        self.thresholds = torch.arange(steps + 1, dtype=torch.float64) / steps
        self.sums = torch.zeros(len(self.METRICS), steps + 1, dtype=torch.float64)
        self.n_images = 0

    def update(self, mask: torch.Tensor, gt: torch.Tensor) -> None:
        """Add the images of a continuous mask (``... x H x W``, leading dims are images)."""
        _check_scores(mask, gt, "ThresholdSweepMeter.update")
        mask = mask if mask.is_floating_point() else mask.float()
        scores = mask.reshape(-1, mask.shape[-2] * mask.shape[-1])
        truth = gt.reshape(scores.shape) >= 0.5
        thresholds = self.thresholds.to(device=scores.device, dtype=scores.dtype)
        n_pixels = scores.shape[-1]
        predicted = _count_at_least(scores, thresholds).double()
        hits = _count_at_least(torch.where(truth, scores, -torch.inf), thresholds).double()
        true = truth.sum(dim=-1, keepdim=True).double()
        both = predicted + true
        neither = 2 * n_pixels - both
        f1_pos = torch.where(both > 0, 2 * hits / both.clamp_min(1), self.empty)
        f1_neg = torch.where(neither > 0, 2 * (n_pixels - both + hits) / neither.clamp_min(1),
                             self.empty)
        union = both - hits
        iou_value = torch.where(union > 0, hits / union.clamp_min(1), self.empty)
        per_image = torch.stack([f1_pos, f1_neg, iou_value])
        self.sums += per_image.sum(dim=1).cpu()
        self.n_images += len(scores)

    def means(self) -> dict[str, torch.Tensor]:
        """Per-threshold means over images (x100) of each metric."""
        if self.n_images == 0:
            raise ValueError("ThresholdSweepMeter: no image was recorded")
        return {name: 100.0 * row / self.n_images for name, row in zip(self.METRICS, self.sums)}

    def at(self, threshold: float) -> dict[str, float]:
        """Means (x100) at one of the sweep thresholds."""
        index = int(torch.argmin((self.thresholds - threshold).abs()))
        if abs(float(self.thresholds[index]) - threshold) > 1e-9:
            raise ValueError(f"ThresholdSweepMeter.at: {threshold} is not a sweep threshold")
        return {name: float(row[index]) for name, row in self.means().items()}


def best_threshold_report(valid: ThresholdSweepMeter,
                          test: ThresholdSweepMeter) -> dict[str, float]:
    """Pick the threshold maximising the mean validation F1+ (lowest on ties) and report the
    test F1+, F1- and IoU (x100) at it, with the validation F1+ and the threshold."""
    if not torch.equal(valid.thresholds, test.thresholds):
        raise ValueError("best_threshold_report: the two meters sweep different thresholds")
    valid_f1 = valid.means()["f1_pos"]
    index = int(torch.argmax(valid_f1))
    report = {"threshold": float(valid.thresholds[index]), "valid_f1_pos": float(valid_f1[index])}
    report.update({f"test_{name}": float(row[index]) for name, row in test.means().items()})
    return report


Key = TypeVar("Key")


def refine_with_crf(crf: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    items: Iterable[tuple[Key, np.ndarray, np.ndarray]],
                    workers: int = 0) -> Iterator[tuple[Key, np.ndarray]]:
    """Apply ``crf(image, mask)`` (e.g. ``tools.CRF``) to ``(key, image, mask)`` items.

    Yields ``(key, refined_mask)`` in input order. ``workers = 0`` runs in this process;
    otherwise a ``ProcessPoolExecutor`` of ``workers`` processes (platform start method) runs
    the CRF with at most ``2 * workers`` images in flight, so ``items`` may be a lazy stream.
    ``crf`` must be picklable; keys stay in this process.
    """
    if workers < 0:
        raise ValueError(f"refine_with_crf: workers must be >= 0, got {workers}")
    if workers == 0:
        for key, image, mask in items:
            yield key, crf(image, mask)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        for key, image, mask in items:
            pending.append((key, pool.submit(crf, image, mask)))
            if len(pending) >= 2 * workers:
                key, future = pending.popleft()
                yield key, future.result()
        while pending:
            key, future = pending.popleft()
            yield key, future.result()
