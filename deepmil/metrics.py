"""Evaluation metrics: F1+/F1-, IoU, top-1 localisation, classification error, PxAP and
threshold sweeps, per image and accumulated over a set by meters.

All tensor functions are vectorised and run on the device of their inputs.
Conventions:
* F1+ is the Dice of the binary foreground sets, F1- the Dice of their complements.
* A Dice (or IoU) of two empty sets is 0/0; it is defined as 1 by default, so an empty prediction
  on an empty ground truth gives F1+ = 1 and a full prediction on a full ground truth F1- = 1.
  ``empty = 0`` (the setting ``metrics.empty_dice: zero``) gives 0 instead, the rule of
  scikit-learn's ``f1_score(zero_division=0)``.
* Set-level F1 values are means of per-image values (not pooled pixels); PxAP pools pixels.
* Per-image functions return fractions; meter results are percentages.

Every meter has ``update(...)`` (add images), ``compute()`` (the result) and
``reduce(all_reduce)`` (sum its state over processes in place, with a function such as
``deepmil.distributed.all_reduce_sum`` that returns the sum over processes of a tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]
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


def _overlap(
    pred: torch.Tensor, target: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(|P n G|, |P|, |G|)`` per image over the last two dimensions, in float64."""
    if pred.shape != target.shape or pred.dim() < 2:
        raise ValueError(
            f"{name} needs two masks of equal shape (>= 2 dims), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
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


def f1_pos_neg(
    pred_mask_continuous: torch.Tensor,
    gt_mask: torch.Tensor,
    threshold: float = 0.5,
    empty: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
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


def iou_at(
    pred_mask_continuous: torch.Tensor,
    gt_mask: torch.Tensor,
    threshold: float = 0.5,
    empty: float = 1.0,
) -> torch.Tensor:
    """Per-image IoU of the prediction binarised ``>= threshold`` (ground truth ``>= 0.5``)."""
    return iou(pred_mask_continuous >= threshold, gt_mask >= 0.5, empty)


def top1_localization(
    correct: torch.Tensor | bool, iou_value: torch.Tensor | float, min_iou: float = 0.5
) -> torch.Tensor:
    """Top-1 localisation hit per image: class correct and IoU ``>= min_iou``."""
    return torch.as_tensor(correct, dtype=torch.bool) & (torch.as_tensor(iou_value) >= min_iou)


def misclassified(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The number of rows of ``scores`` (n x classes) whose highest score is not at the row's
    label in ``labels`` (n), as an int64 scalar tensor on the device of the inputs."""
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(
            f"misclassified needs n x classes scores and n labels of equal size, "
            f"got shapes {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    return (scores.argmax(dim=1) != labels).sum()


def error_rate(errors: int | float, n: int | float) -> float:
    """Classification error in percent: ``errors`` misclassified of ``n`` images."""
    return 100.0 * errors / n


class LocalizationMeter:
    """Per-image F1+, F1-, IoU, top-1 localisation, classification error and losses of one
    evaluation pass, averaged per image.

    An image without a ground truth (F1+ and F1- ``None``) counts in the classification error
    and the losses only: the localisation quantities are averaged over the images that gave
    them (``n_localized``), and are NaN when none did.

    The state is sums and counts: ``n_images``, ``errors`` (misclassified images), ``hits``
    (top-1 localisation hits), and per quantity its sum (``sums``) and the number of images
    that gave it (``counts``). Sums accumulate in update order, so one meter updated with the
    per-image values in image order (as ``deepmil.engine.summarise`` does with the rows gathered
    from all processes) gives the same bits on any number of processes; :meth:`reduce` adds the
    processes' sums instead, which may differ from that in the last bits.
    """

    METRICS = ("f1_pos", "f1_neg", "f1_pos_all_ones", "iou")

    def __init__(self) -> None:
        self.n_images = 0
        self.errors = 0
        self.hits = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @property
    def n_localized(self) -> int:
        """The number of images recorded with a ground truth (an F1+)."""
        return self.counts.get("f1_pos", 0)

    def update(
        self,
        f1_pos: float | None,
        f1_neg: float | None,
        correct: bool,
        losses: Mapping[str, float] | None = None,
        f1_pos_all_ones: float | None = None,
        iou: float | None = None,
    ) -> None:
        """Record one image: its F1+/F1- (fractions; ``None`` without a ground truth), whether
        its label was right, its losses (e.g. ``{"loss": .., "loss_pos": .., "loss_neg": ..,
        "loss_seg": ..}``; names other than those of ``METRICS``) and optionally the F1+ of an
        all-ones prediction and the IoU of the prediction (fraction)."""
        clashing = set(losses or {}) & set(self.METRICS)
        if clashing:
            raise ValueError(
                f"LocalizationMeter.update: loss names {sorted(clashing)} are metric names"
            )
        values = {
            "f1_pos": f1_pos,
            "f1_neg": f1_neg,
            "f1_pos_all_ones": f1_pos_all_ones,
            "iou": iou,
            **(losses or {}),
        }
        for name, value in values.items():
            if value is not None:
                self.sums[name] = self.sums.get(name, 0.0) + float(value)
                self.counts[name] = self.counts.get(name, 0) + 1
        self.n_images += 1
        self.errors += not bool(correct)
        if iou is not None:
            self.hits += int(top1_localization(bool(correct), float(iou)))

    def compute(self) -> dict[str, float | int | None]:
        """Per-image means: ``cl_error`` (%), ``f1_pos``/``f1_neg``/``f1_pos_all_ones`` (x100,
        None when never given), one entry per loss name, and ``n_images``. When IoUs were given:
        ``iou`` (x100) and ``top1_loc`` (% of images with the right class and IoU >= 0.5).
        The localisation means are over the images with a ground truth; when no image had one,
        all five are NaN."""
        n, localized = self.n_images, self.n_localized
        if n == 0:
            raise ValueError("LocalizationMeter.compute: no image was recorded")
        for name, count in self.counts.items():
            expected = localized if name in self.METRICS else n
            if count != expected:
                raise ValueError(
                    f"LocalizationMeter.compute: '{name}' given for {count} of {expected} images"
                )
        if localized == 0:
            localization = dict.fromkeys(("f1_pos", "f1_neg", "f1_pos_all_ones", "iou"), math.nan)
            localization["top1_loc"] = math.nan
        else:
            localization = {
                name: 100.0 * self.sums[name] / localized if name in self.sums else None
                for name in ("f1_pos", "f1_neg", "f1_pos_all_ones")
            }
            if "iou" in self.sums:
                localization["iou"] = 100.0 * self.sums["iou"] / localized
                localization["top1_loc"] = 100.0 * (self.hits / localized)
        out: dict[str, float | int | None] = {
            "cl_error": error_rate(self.errors, n),
            **localization,
        }
        out.update(
            {name: total / n for name, total in self.sums.items() if name not in self.METRICS}
        )
        out["n_images"] = n
        return out

    def reduce(self, all_reduce: AllReduce) -> None:
        """Sum the state over processes; every process must have recorded the same quantities
        (names, in the same order)."""
        state = torch.tensor(
            [self.n_images, self.errors, self.hits, *self.sums.values(), *self.counts.values()],
            dtype=torch.float64,
        )
        n_images, errors, hits, *rest = all_reduce(state).tolist()
        self.n_images, self.errors, self.hits = int(n_images), int(errors), int(hits)
        names = list(self.sums)
        self.sums = dict(zip(names, rest[: len(names)]))
        self.counts = {name: int(count) for name, count in zip(names, rest[len(names) :])}


def _check_scores(mask: torch.Tensor, gt: torch.Tensor, name: str) -> None:
    if mask.shape != gt.shape or mask.dim() < 2:
        raise ValueError(
            f"{name}: mask and ground truth need equal shapes (>= 2 dims), got "
            f"{tuple(mask.shape)} and {tuple(gt.shape)}"
        )
    if mask.numel() and not (mask.min() >= 0 and mask.max() <= 1):
        raise ValueError(
            f"{name}: mask values must lie in [0, 1], got "
            f"[{mask.min().item()}, {mask.max().item()}]"
        )


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
    of shards add up (:meth:`reduce`).
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

    def reduce(self, all_reduce: AllReduce) -> None:
        """Sum the counts over processes."""
        self.counts = all_reduce(self.counts)

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
    F1+, F1-, IoU) and ``n_images`` are the whole state; meters of shards add up
    (:meth:`reduce`)."""

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
        f1_neg = torch.where(
            neither > 0, 2 * (n_pixels - both + hits) / neither.clamp_min(1), self.empty
        )
        union = both - hits
        iou_value = torch.where(union > 0, hits / union.clamp_min(1), self.empty)
        per_image = torch.stack([f1_pos, f1_neg, iou_value])
        self.sums += per_image.sum(dim=1).cpu()
        self.n_images += len(scores)

    def compute(self) -> dict[str, torch.Tensor]:
        """Per-threshold means over images (x100) of each metric."""
        if self.n_images == 0:
            raise ValueError("ThresholdSweepMeter: no image was recorded")
        return {name: 100.0 * row / self.n_images for name, row in zip(self.METRICS, self.sums)}

    def at(self, threshold: float) -> dict[str, float]:
        """Means (x100) at one of the sweep thresholds."""
        index = int(torch.argmin((self.thresholds - threshold).abs()))
        if abs(float(self.thresholds[index]) - threshold) > 1e-9:
            raise ValueError(f"ThresholdSweepMeter.at: {threshold} is not a sweep threshold")
        return {name: float(row[index]) for name, row in self.compute().items()}

    def reduce(self, all_reduce: AllReduce) -> None:
        """Sum the sums and the number of images over processes."""
        self.sums = all_reduce(self.sums)
        self.n_images = int(all_reduce(torch.tensor(self.n_images)))


def best_threshold_report(
    valid: ThresholdSweepMeter, test: ThresholdSweepMeter
) -> dict[str, float]:
    """Pick the threshold maximising the mean validation F1+ (lowest on ties) and report the
    test F1+, F1- and IoU (x100) at it, with the validation F1+ and the threshold. Every value
    is NaN when either set recorded no image (none had a ground truth)."""
    if not torch.equal(valid.thresholds, test.thresholds):
        raise ValueError("best_threshold_report: the two meters sweep different thresholds")
    if valid.n_images == 0 or test.n_images == 0:
        names = ("threshold", "valid_f1_pos", *(f"test_{name}" for name in test.METRICS))
        return dict.fromkeys(names, math.nan)
    valid_f1 = valid.compute()["f1_pos"]
    index = int(torch.argmax(valid_f1))
    report = {"threshold": float(valid.thresholds[index]), "valid_f1_pos": float(valid_f1[index])}
    report.update({f"test_{name}": float(row[index]) for name, row in test.compute().items()})
    return report
