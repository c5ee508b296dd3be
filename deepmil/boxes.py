"""Box localisation metrics of the weakly supervised object localisation literature, from the
same continuous maps as the pixel metrics.

A map in [0, 1] is quantised to 8 bits (``uint8(map * 255)``); at each threshold ``t`` of
``0, interval, 2 interval, ... < 1`` its pixels above ``int(t * max)`` form a binary mask whose
outer contours (OpenCV, 8-connected) give the estimated boxes: the one of the largest contour
(MaxBoxAcc) or one per contour (MaxBoxAccV2). An image is localised at ``(t, delta)`` when one
estimated box has an IoU of at least ``delta`` with one ground-truth box (boxes are inclusive
pixel rectangles ``(x0, y0, x1, y1)``). Per IoU threshold ``delta``, the box accuracy is the
share of localised images at the best ``t``:

* ``max_box_acc``: largest contour, ``delta = 0.5`` (the GT-known localisation accuracy);
* ``max_box_acc_v2``: every contour, mean over ``delta`` = 0.3, 0.5, 0.7 (each at its own best
  ``t``), with the three values as ``max_box_acc_v2_<delta>``;
* ``top1_box_loc``: the share of images both correctly classified and localised (largest
  contour, ``delta = 0.5``) at the threshold of ``max_box_acc``.

The ground-truth boxes are those of the outer contours of the ground-truth mask (one per
connected region), or given boxes (e.g. CUB's ``bounding_boxes.txt``).
"""

from __future__ import annotations

import cv2
import numpy as np

IOU_THRESHOLDS = (0.3, 0.5, 0.7)
EMPTY_BOX = np.zeros((1, 4), dtype=np.int64)


def contour_boxes(binary: np.ndarray, largest_only: bool) -> np.ndarray:
    """Inclusive boxes ``(x0, y0, x1, y1)`` of the outer contours of a binary image (of the
    largest contour by area when ``largest_only``); one empty box at the origin if none."""
    contours, _ = cv2.findContours(
        binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if not contours:
        return EMPTY_BOX
    if largest_only:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for contour in contours:
        x, y, width, height = cv2.boundingRect(contour)
        boxes.append((x, y, x + width - 1, y + height - 1))
    return np.asarray(boxes, dtype=np.int64)


def box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """IoU of every box of ``first`` (n x 4) with every box of ``second`` (m x 4): n x m, for
    inclusive pixel boxes."""
    a, b = first[:, None, :].astype(np.float64), second[None, :, :].astype(np.float64)
    width = np.clip(
        np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1, 0, None
    )
    height = np.clip(
        np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1, 0, None
    )
    overlap = width * height
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return overlap / (area_a + area_b - overlap)


def mask_boxes(mask: np.ndarray) -> np.ndarray:
    """Ground-truth boxes of a binary mask: one per outer contour (connected region)."""
    return contour_boxes(mask, largest_only=False)


def quantised(values: np.ndarray) -> np.ndarray:
    """A map in [0, 1] as 8-bit levels, truncated as ``uint8(map * 255)``."""
    return (np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)


class BoxAccuracyMeter:
    """Counts, per map threshold and IoU threshold, of the images whose estimated box is right
    (see the module docstring); ``update`` one image at a time, ``compute`` the accuracies (%).
    Meters of shards add up (:meth:`merge`)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.thresholds = np.arange(0.0, 1.0, interval)
        shape = (len(IOU_THRESHOLDS), len(self.thresholds))
        self.largest = np.zeros(shape, dtype=np.int64)
        self.every = np.zeros(shape, dtype=np.int64)
        self.top1 = np.zeros(len(self.thresholds), dtype=np.int64)
        self.n_images = 0

    def best_ious(
        self, values: np.ndarray, truth_boxes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per map threshold, the best IoU with the truth of the largest contour's box and of any
        contour's box."""
        levels = quantised(values)
        peak = int(levels.max())
        cuts = (self.thresholds * peak).astype(np.int64)
        largest = np.empty(len(cuts))
        every = np.empty(len(cuts))
        for cut in np.unique(cuts):
            binary = levels > cut
            at = cuts == cut
            largest[at] = box_iou(contour_boxes(binary, True), truth_boxes).max()
            every[at] = box_iou(contour_boxes(binary, False), truth_boxes).max()
        return largest, every

    def update(self, values: np.ndarray, truth_boxes: np.ndarray, correct: bool = True) -> None:
        """Add one image: its map (h x w, in [0, 1]), its ground-truth boxes (m x 4) and whether
        its class was predicted correctly."""
        largest, every = self.best_ious(
            np.asarray(values, dtype=np.float64), np.asarray(truth_boxes)
        )
        for row, delta in enumerate(IOU_THRESHOLDS):
            self.largest[row] += largest >= delta
            self.every[row] += every >= delta
        if correct:
            self.top1 += largest >= 0.5
        self.n_images += 1

    def merge(self, other: BoxAccuracyMeter) -> None:
        """Add the counts of ``other`` (another shard of the same set)."""
        self.largest += other.largest
        self.every += other.every
        self.top1 += other.top1
        self.n_images += other.n_images

    def compute(self) -> dict[str, float]:
        """``max_box_acc``, ``max_box_acc_v2`` (and per IoU threshold), ``top1_box_loc`` and the
        map threshold of ``max_box_acc`` (``box_threshold``); empty when no image was added."""
        if self.n_images == 0:
            return {}
        share = 100.0 / self.n_images
        middle = IOU_THRESHOLDS.index(0.5)
        best = int(self.largest[middle].argmax())
        v2 = {
            f"max_box_acc_v2_{round(100 * delta)}": float(self.every[row].max() * share)
            for row, delta in enumerate(IOU_THRESHOLDS)
        }
        return {
            "max_box_acc": float(self.largest[middle, best] * share),
            "max_box_acc_v2": float(np.mean(list(v2.values()))),
            **v2,
            "top1_box_loc": float(self.top1[best] * share),
            "box_threshold": float(self.thresholds[best]),
        }
