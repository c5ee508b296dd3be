"""Box localisation metrics (``deepmil.boxes``) on hand-built maps."""

import numpy as np
import pytest

from deepmil import boxes


def square(size: int, top: int, left: int, side: int, value: float = 1.0) -> np.ndarray:
    values = np.zeros((size, size))
    values[top : top + side, left : left + side] = value
    return values


def test_box_iou_of_inclusive_pixel_boxes():
    first = np.array([[0, 0, 9, 9]])
    second = np.array([[5, 5, 14, 14], [0, 0, 9, 9], [10, 10, 12, 12]])
    np.testing.assert_allclose(boxes.box_iou(first, second), [[25 / 175, 1.0, 0.0]])


def test_contour_boxes_and_the_largest_one():
    binary = np.zeros((20, 20), dtype=bool)
    binary[2:5, 3:8] = True  # rows 2-4, columns 3-7
    binary[10:18, 1:19] = True
    binary[12:14, 5:9] = False  # a hole: no box of its own
    every = boxes.contour_boxes(binary, largest_only=False)
    assert sorted(map(tuple, every)) == [(1, 10, 18, 17), (3, 2, 7, 4)]
    assert boxes.contour_boxes(binary, largest_only=True).tolist() == [[1, 10, 18, 17]]
    assert boxes.contour_boxes(np.zeros((4, 4), dtype=bool), True).tolist() == [[0, 0, 0, 0]]
    assert boxes.mask_boxes(binary).shape == (2, 4)


def test_a_map_on_its_box_is_right_at_every_threshold():
    truth = boxes.mask_boxes(square(32, 4, 6, 10) > 0)
    meter = boxes.BoxAccuracyMeter(interval=0.01)
    meter.update(square(32, 4, 6, 10), truth, correct=True)
    result = meter.compute()
    assert result["max_box_acc"] == result["max_box_acc_v2"] == result["top1_box_loc"] == 100.0
    assert meter.largest.min() == 1 and meter.every.min() == 1
    wrong_class = boxes.BoxAccuracyMeter(interval=0.01)
    wrong_class.update(square(32, 4, 6, 10), truth, correct=False)
    assert wrong_class.compute()["top1_box_loc"] == 0.0
    assert wrong_class.compute()["max_box_acc"] == 100.0


def test_an_iou_of_one_third_counts_at_0_3_only():
    """Boxes of 10 x 10 and 10 x 5 pixels sharing 10 x 5: IoU 50 / 100 = 0.5; shifted by 5
    more columns: IoU 0; shifted so that they share 10 x 5 of 10 x 10 each: 50 / 150."""
    truth = np.array([[0, 0, 9, 9]])
    meter = boxes.BoxAccuracyMeter(interval=0.1)
    meter.update(square(20, 0, 5, 10), truth)
    result = meter.compute()
    assert result["max_box_acc_v2_30"] == 100.0
    assert result["max_box_acc_v2_50"] == result["max_box_acc_v2_70"] == 0.0
    assert result["max_box_acc_v2"] == pytest.approx(100 / 3)
    assert result["max_box_acc"] == 0.0


def test_the_best_threshold_separates_the_object_from_its_surround():
    """0.2 over the whole image and 0.8 on the object: levels 51 and 204, so the object stands
    alone for cuts int(t * 204) >= 51, i.e. from t = 0.25 on."""
    values = np.full((40, 40), 0.2)
    values[10:20, 10:20] = 0.8
    meter = boxes.BoxAccuracyMeter(interval=0.001)
    meter.update(values, np.array([[10, 10, 19, 19]]))
    result = meter.compute()
    assert result["max_box_acc"] == 100.0
    assert result["box_threshold"] == pytest.approx(0.25, abs=0.0015)
    expected = (meter.thresholds * 204).astype(int) >= 51
    np.testing.assert_array_equal(meter.largest[1], expected)


def test_every_contour_finds_the_smaller_object_the_largest_misses():
    values = square(40, 0, 0, 20) + square(40, 30, 30, 6)
    truth = np.array([[30, 30, 35, 35]])
    meter = boxes.BoxAccuracyMeter(interval=0.05)
    meter.update(values, truth)
    other = boxes.BoxAccuracyMeter(interval=0.05)
    other.update(square(40, 30, 30, 6), truth)
    meter.merge(other)
    result = meter.compute()
    assert meter.n_images == 2
    assert result["max_box_acc"] == 50.0 and result["max_box_acc_v2_50"] == 100.0


def test_an_empty_meter_reports_nothing():
    assert boxes.BoxAccuracyMeter().compute() == {}
