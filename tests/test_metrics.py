"""Metrics: Dice/F1+-, IoU, PxAP, threshold sweeps, top-1 localisation, classification error,
meters and their reduction over processes."""

from collections.abc import Callable

import numpy as np
import pytest
import torch

from deepmil.metrics import (
    LocalizationMeter,
    PxAPMeter,
    ThresholdSweepMeter,
    all_ones_f1,
    best_threshold_report,
    dice,
    error_rate,
    f1_pos_neg,
    iou,
    iou_at,
    misclassified,
    top1_localization,
)


def hand_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """P has 3 pixels, G has 2, one in common, on a 4 x 4 grid (16 pixels)."""
    pred = torch.zeros(4, 4)
    pred[0, 0] = pred[0, 1] = pred[1, 1] = 0.9
    gt = torch.zeros(4, 4)
    gt[0, 0] = gt[3, 3] = 1.0
    return pred, gt


def test_f1_pos_neg_hand_computed():
    pred, gt = hand_masks()
    f1_pos, f1_neg = f1_pos_neg(pred, gt)
    assert f1_pos.item() == pytest.approx(2 * 1 / 5)
    # Complements: |1-P| = 13, |1-G| = 14, overlap = 16 - |P u G| = 16 - 4 = 12.
    assert f1_neg.item() == pytest.approx(2 * 12 / 27)


def test_f1_threshold_is_inclusive_and_batched():
    gt = torch.zeros(2, 1, 2, 2)
    gt[0, 0, 0, 0] = 1.0
    pred = torch.zeros(2, 1, 2, 2)
    pred[0, 0, 0, 0] = 0.5
    pred[1, 0, 1, 1] = 0.49
    f1_pos, f1_neg = f1_pos_neg(pred, gt)
    assert f1_pos.shape == (2, 1)
    assert f1_pos[0, 0].item() == 1.0 and f1_neg[0, 0].item() == 1.0
    # Second image: nothing predicted (0.49 < 0.5) and nothing true -> F1+ = 1 by convention.
    assert f1_pos[1, 0].item() == 1.0 and f1_neg[1, 0].item() == 1.0


def test_dice_conventions():
    empty = torch.zeros(3, 3, dtype=torch.bool)
    full = torch.ones(3, 3, dtype=torch.bool)
    assert dice(empty, empty).item() == 1.0
    assert dice(full, empty).item() == 0.0
    f1_pos, f1_neg = f1_pos_neg(torch.ones(3, 3), torch.ones(3, 3))
    assert f1_pos.item() == 1.0 and f1_neg.item() == 1.0
    with pytest.raises(ValueError, match="equal shape"):
        dice(empty, torch.zeros(3, 4))


def test_empty_set_convention_zero():
    empty = torch.zeros(2, 3, 3)
    full = torch.ones(2, 3, 3)
    assert dice(empty, empty, empty=0.0).tolist() == [0.0, 0.0]
    assert iou(empty, empty, empty=0.0).tolist() == [0.0, 0.0]
    assert f1_pos_neg(empty, empty, empty=0.0)[0].tolist() == [0.0, 0.0]
    assert f1_pos_neg(full, full, empty=0.0)[1].tolist() == [0.0, 0.0]
    assert all_ones_f1(full, empty=0.0)[1].tolist() == [0.0, 0.0]
    # Only the 0/0 case changes.
    pred, gt = hand_masks()
    assert dice(pred != 0, gt, empty=0.0).item() == dice(pred != 0, gt).item()
    sweep = ThresholdSweepMeter(empty=0.0)
    sweep.update(torch.zeros(4, 4), torch.zeros(4, 4))
    assert sweep.at(0.01) == {"f1_pos": 0.0, "f1_neg": 100.0, "iou": 0.0}


def test_all_ones_f1():
    _, gt = hand_masks()
    f1_pos, f1_neg = all_ones_f1(gt)
    assert f1_pos.item() == pytest.approx(2 * 2 / (2 + 16))
    assert f1_neg.item() == 0.0
    batch = torch.zeros(2, 1, 4, 4)
    batch[1, 0, :2] = 1.0
    f1_pos, f1_neg = all_ones_f1(batch)
    assert f1_pos.flatten().tolist() == pytest.approx([0.0, 2 * 8 / 24])
    assert f1_neg.flatten().tolist() == [0.0, 0.0]


def test_misclassified_and_error_rate():
    scores = torch.eye(3)[[0, 1, 2, 2, 1]]  # predicted classes 0, 1, 2, 2, 1
    true = torch.tensor([0, 2, 2, 1, 1])
    errors = misclassified(scores, true)
    assert errors.dtype == torch.int64 and int(errors) == 2
    assert error_rate(int(errors), len(true)) == pytest.approx(40.0)
    assert error_rate(int(misclassified(scores[:2], torch.tensor([0, 1]))), 2) == 0.0
    with pytest.raises(ValueError, match="equal size"):
        misclassified(scores[:2], true[:1])


def test_localization_meter_means_per_image():
    meter = LocalizationMeter()
    meter.update(1.0, 0.5, True, {"loss": 2.0, "loss_pos": 1.0}, f1_pos_all_ones=0.2)
    meter.update(0.0, 0.9, False, {"loss": 4.0, "loss_pos": 3.0}, f1_pos_all_ones=0.4)
    meter.update(torch.tensor(0.5), 0.1, True, {"loss": 0.0, "loss_pos": 2.0}, f1_pos_all_ones=0.6)
    summary = meter.compute()
    assert summary["n_images"] == 3
    assert summary["cl_error"] == pytest.approx(100 / 3)
    assert summary["f1_pos"] == pytest.approx(50.0)
    assert summary["f1_neg"] == pytest.approx(50.0)
    assert summary["f1_pos_all_ones"] == pytest.approx(40.0)
    assert summary["loss"] == pytest.approx(2.0)
    assert summary["loss_pos"] == pytest.approx(2.0)


def test_localization_meter_per_image_not_pooled():
    # A 1-pixel-object image scored 0 and a large-object image scored 1: mean is 0.5 whatever
    # the object sizes.
    small_pred, small_gt = torch.zeros(8, 8), torch.zeros(8, 8)
    small_gt[0, 0] = 1
    big_pred, big_gt = torch.ones(8, 8), torch.ones(8, 8)
    meter = LocalizationMeter()
    for pred, gt in ((small_pred, small_gt), (big_pred, big_gt)):
        f1_pos, f1_neg = f1_pos_neg(pred, gt)
        meter.update(f1_pos.item(), f1_neg.item(), True)
    summary = meter.compute()
    assert summary["f1_pos"] == pytest.approx(50.0)
    assert summary["f1_pos_all_ones"] is None
    assert summary["cl_error"] == 0.0


def test_localization_meter_errors():
    with pytest.raises(ValueError, match="no image"):
        LocalizationMeter().compute()
    meter = LocalizationMeter()
    meter.update(1.0, 1.0, True, f1_pos_all_ones=0.5)
    meter.update(1.0, 1.0, True)
    with pytest.raises(ValueError, match="f1_pos_all_ones"):
        meter.compute()


def test_iou_hand_computed_and_conventions():
    pred, gt = hand_masks()
    assert iou(pred != 0, gt).item() == pytest.approx(1 / 4)  # |P n G| = 1, |P u G| = 4
    assert iou_at(pred, gt).item() == pytest.approx(1 / 4)
    assert iou_at(pred, gt, threshold=0.95).item() == 0.0  # nothing predicted, G not empty
    empty = torch.zeros(2, 3, 3)
    assert iou(empty, empty).tolist() == [1.0, 1.0]
    assert iou(torch.ones(3, 3), empty[0]).item() == 0.0
    with pytest.raises(ValueError, match="equal shape"):
        iou(empty, torch.zeros(3, 4))


def test_top1_localization():
    hits = top1_localization(
        torch.tensor([True, True, False, True]), torch.tensor([0.5, 0.49, 0.9, 1.0])
    )
    assert hits.tolist() == [True, False, False, True]
    assert bool(top1_localization(True, 0.7, min_iou=0.8)) is False


def test_localization_meter_iou_and_top1_loc():
    meter = LocalizationMeter()
    meter.update(0.8, 0.9, True, iou=0.6)
    meter.update(0.8, 0.9, False, iou=0.8)
    meter.update(0.3, 0.9, True, iou=0.2)
    summary = meter.compute()
    assert summary["iou"] == pytest.approx(100 * 1.6 / 3)
    assert summary["top1_loc"] == pytest.approx(100 / 3)  # only the first image
    plain = LocalizationMeter()
    plain.update(1.0, 1.0, True)
    assert "iou" not in plain.compute() and "top1_loc" not in plain.compute()
    plain.update(1.0, 1.0, True, iou=1.0)
    with pytest.raises(ValueError, match="'iou' given for 1 of 2"):
        plain.compute()


def reference_pxap(scores: np.ndarray, truth: np.ndarray, interval: float) -> float:
    """PxAP as wsolevaluation's ``MaskEvaluator`` computes it (percent)."""
    edges = np.append(np.arange(0, 1, interval), [1.0, 2.0, 3.0])
    true_hist, _ = np.histogram(scores[truth == 1], bins=edges)
    false_hist, _ = np.histogram(scores[truth == 0], bins=edges)
    tp, fp = true_hist[::-1].cumsum(), false_hist[::-1].cumsum()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = tp / (tp + fp), tp / true_hist.sum()
    auc = precision[1:] * np.diff(recall)
    return 100 * auc[~np.isnan(auc)].sum()


def meter_pxap(scores, truth, interval: float) -> float:
    meter = PxAPMeter(interval)
    meter.update(torch.as_tensor(scores), torch.as_tensor(truth))
    return meter.compute()


def binned_sklearn_pxap(scores: np.ndarray, truth: np.ndarray, interval: float) -> float:
    """scikit-learn's average precision of the scores replaced by their bin index."""
    from sklearn.metrics import average_precision_score

    edges = np.append(np.arange(0, 1, interval), [1.0, 2.0, 3.0])
    bins = np.searchsorted(edges, scores.ravel(), side="right") - 1
    return 100 * average_precision_score(truth.ravel(), bins)


def test_pxap_hand_computed_and_streamed():
    # Scores 0.9 (fg), 0.8 (bg), 0.3 (fg), 0.1 (bg). Going down the thresholds:
    # t=0.9: P=1 R=1/2; t=0.8: P=1/2 R=1/2; t=0.3: P=2/3 R=1; t=0.1: P=1/2 R=1.
    # AP = 1/2 * 1 + 0 + 1/2 * 2/3 + 0 = 5/6.
    mask = torch.tensor([[0.9, 0.8], [0.3, 0.1]])
    gt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    meter = PxAPMeter()
    meter.update(mask, gt)
    assert meter.compute() == pytest.approx(100 * 5 / 6)
    precision, recall = meter.curve()
    assert precision.shape == recall.shape == (1002,)  # 1000 bins, 1.0's bin, an empty one
    assert recall[-1] == 1.0 and precision[-1] == 0.5
    streamed = PxAPMeter()
    streamed.update(mask[:1], gt[:1])
    streamed.update(mask[1:], gt[1:])
    assert torch.equal(streamed.counts, meter.counts)
    assert streamed.compute() == pytest.approx(100 * 5 / 6)


def test_pxap_bins_of_the_reference_one_and_grid_ties():
    # interval 0.1: the edges are np.arange(0, 1, 0.1), whose 7th edge is 0.7000000000000001,
    # so a score of exactly 0.7 falls into [0.6, 0.7000000000000001) with 0.69 (a tie).
    # fg 1.0 (its own bin, first), fg 0.7, bg 0.69, bg 0.0:
    # P=1 R=1/2; then the tie: P=2/3 R=1; AP = 1/2 + 1/2 * 2/3 = 5/6 (floor(10 s) gives 1).
    scores = np.array([[1.0, 0.7], [0.69, 0.0]])
    truth = np.array([[1, 1], [0, 0]])
    assert meter_pxap(scores, truth, 0.1) == pytest.approx(100 * 5 / 6, abs=1e-12)
    # 1.0 ranks above every other score: fg 1.0, bg 0.97, fg 0.95 at interval 0.1 gives
    # P=1 R=1/2, then P=2/3 R=1: AP = 5/6 (one top bin [0.9, 1] would give 2/3).
    scores = np.array([[1.0, 0.97, 0.95]])
    truth = np.array([[1, 0, 1]])
    assert meter_pxap(scores, truth, 0.1) == pytest.approx(100 * 5 / 6, abs=1e-12)
    perfect = PxAPMeter(0.1)
    gt = torch.zeros(1, 4, 5)
    gt[0, :2, :3] = 1
    perfect.update(gt.clone(), gt)  # exact 0 in the first bin, exact 1 in its own bin
    assert perfect.compute() == pytest.approx(100.0)
    assert perfect.counts.tolist() == [[14] + [0] * 11, [0] * 10 + [6, 0]]


@pytest.mark.parametrize("interval", [0.01, 0.001])
def test_pxap_equals_the_reference_and_binned_sklearn(interval):
    generator = np.random.default_rng(0)
    truth = (generator.random((3, 40, 50)) < 0.3).astype(np.int64)
    grid = np.round(generator.integers(0, 101, truth.shape) / 100, 2)  # exactly on the grid
    cases = {
        "continuous": generator.random(truth.shape).astype(np.float32),
        "separable": np.clip(0.6 * truth + 0.5 * generator.random(truth.shape), 0, 1),
        "on the decimal grid": grid,
        "zeros and ones": generator.integers(0, 2, truth.shape).astype(np.float64),
        "float32 grid": grid.astype(np.float32),
    }
    for name, scores in cases.items():
        expected = reference_pxap(scores, truth, interval)
        assert meter_pxap(scores, truth, interval) == pytest.approx(expected, abs=1e-9), name
        assert binned_sklearn_pxap(scores, truth, interval) == pytest.approx(expected, abs=1e-9), (
            name
        )


def test_pxap_constant_and_bounds():
    gt = torch.zeros(1, 4, 5)
    gt[0, :2, :3] = 1  # 6 of 20 pixels
    constant = PxAPMeter()
    constant.update(torch.full((1, 4, 5), 0.75), gt)
    assert constant.compute() == pytest.approx(100 * 6 / 20)  # precision = prevalence
    coarse = constant.coarse_counts(50)
    assert coarse.shape == (2, 50) and coarse[:, 37].tolist() == [14, 6]
    assert coarse.sum() == 20
    empty = PxAPMeter()
    empty.update(torch.rand(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="no ground-truth foreground"):
        empty.compute()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        empty.update(torch.full((3, 3), 1.5), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="interval"):
        PxAPMeter(0.0)


def test_threshold_sweep_hand_computed():
    mask = torch.tensor([[0.2, 0.6], [0.6, 0.9]])
    gt = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    meter = ThresholdSweepMeter()
    meter.update(mask, gt)
    assert meter.n_images == 1
    # t = 0.5: P = 3 pixels, G = 2, TP = 2; background: 1 predicted, 2 true, 1 common.
    assert meter.at(0.5) == pytest.approx({"f1_pos": 80.0, "f1_neg": 200 / 3, "iou": 200 / 3})
    # t = 0.7: P = 1, TP = 1; background: 3 predicted, 2 true, 2 common.
    assert meter.at(0.7) == pytest.approx({"f1_pos": 200 / 3, "f1_neg": 80.0, "iou": 50.0})
    # Inclusive thresholds: 0.6 still keeps the two 0.6 pixels.
    assert meter.at(0.6)["f1_pos"] == pytest.approx(80.0)
    assert meter.at(0.61)["f1_pos"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="not a sweep threshold"):
        meter.at(0.505)


def test_threshold_sweep_all_ones_and_empty_masks():
    gt = torch.zeros(2, 4, 4)
    gt[0, :1] = 1  # 4 of 16
    gt[1, :2] = 1  # 8 of 16
    ones = ThresholdSweepMeter()
    ones.update(torch.ones(2, 4, 4), gt)
    means = ones.compute()
    expected = 100 * (2 * 4 / 20 + 2 * 8 / 24) / 2  # F1+ = 2 fg / (fg + N) per image
    assert torch.allclose(means["f1_pos"], torch.full((101,), expected, dtype=torch.float64))
    assert torch.all(means["f1_neg"] == 0.0)
    assert torch.allclose(
        means["iou"], torch.full((101,), 100 * (4 / 16 + 8 / 16) / 2, dtype=torch.float64)
    )
    empty = ThresholdSweepMeter()
    empty.update(torch.zeros(4, 4), torch.zeros(4, 4))
    # t = 0: every pixel is predicted (0 >= 0) on an empty truth; t > 0: both empty -> 1.
    assert empty.at(0.0) == {"f1_pos": 0.0, "f1_neg": 0.0, "iou": 0.0}
    assert empty.at(0.01) == {"f1_pos": 100.0, "f1_neg": 100.0, "iou": 100.0}
    with pytest.raises(ValueError, match="no image"):
        ThresholdSweepMeter().compute()


def test_threshold_sweep_matches_per_image_functions():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 1, 9, 7, generator=generator)
    mask[0, 0, 0, :3] = torch.tensor([0.5, 0.3, 0.29])  # values on the thresholds
    gt = (torch.rand(3, 1, 9, 7, generator=generator) > 0.6).float()
    meter = ThresholdSweepMeter()
    meter.update(mask, gt)
    assert meter.n_images == 3
    for threshold in (0.0, 0.29, 0.3, 0.5, 0.77, 1.0):
        f1_pos, f1_neg = f1_pos_neg(mask, gt, threshold)
        expected = {
            "f1_pos": 100 * f1_pos.mean().item(),
            "f1_neg": 100 * f1_neg.mean().item(),
            "iou": 100 * iou_at(mask, gt, threshold).mean().item(),
        }
        assert meter.at(threshold) == pytest.approx(expected)


def test_best_threshold_report():
    valid = ThresholdSweepMeter()
    # F1+ is 2/3 for t <= 0.2, 4/5 for 0.2 < t <= 0.6, 2/3 up to 0.9, then 0.
    valid.update(torch.tensor([[0.2, 0.6], [0.6, 0.9]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    test = ThresholdSweepMeter()
    test.update(torch.ones(2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    report = best_threshold_report(valid, test)
    assert report == pytest.approx(
        {
            "threshold": 0.21,
            "valid_f1_pos": 80.0,
            "test_f1_pos": 40.0,
            "test_f1_neg": 0.0,
            "test_iou": 25.0,
        }
    )
    with pytest.raises(ValueError, match="different thresholds"):
        best_threshold_report(valid, ThresholdSweepMeter(steps=10))


def all_reduce_with(partner) -> Callable[[torch.Tensor], torch.Tensor]:
    """The all-reduce of a second process holding the meter ``partner``: each call adds the
    tensor that ``partner.reduce`` passes at the same call."""
    passed = []
    partner.reduce(lambda tensor: passed.append(tensor.clone()) or tensor)
    return lambda tensor: tensor.add_(passed.pop(0))


def filled(make, updates):
    meter = make()
    for arguments in updates:
        meter.update(*arguments)
    return meter


def reduced_and_concatenated(make, shards):
    """Meters of two shards (lists of ``update`` arguments): ``(the first reduced with the
    second, the first reduced with a doubling all-reduce, the meter of both shards, the meter of
    the first shard twice)``."""
    reduced = filled(make, shards[0])
    reduced.reduce(all_reduce_with(filled(make, shards[1])))
    doubled = filled(make, shards[0])
    doubled.reduce(lambda tensor: tensor.mul_(2))
    return reduced, doubled, filled(make, shards[0] + shards[1]), filled(make, shards[0] * 2)


def test_pxap_reduce_gives_the_meter_of_the_concatenated_data():
    generator = torch.Generator().manual_seed(0)
    shards = [
        [
            (
                torch.rand(2, 6, 5, generator=generator),
                (torch.rand(2, 6, 5, generator=generator) > 0.5).float(),
            )
        ]
        for _ in range(2)
    ]
    reduced, doubled, whole, twice = reduced_and_concatenated(PxAPMeter, shards)
    assert torch.equal(reduced.counts, whole.counts) and torch.equal(doubled.counts, twice.counts)
    assert reduced.compute() == whole.compute() and doubled.compute() == twice.compute()


def test_threshold_sweep_reduce_gives_the_meter_of_the_concatenated_data():
    generator = torch.Generator().manual_seed(1)
    shards = [
        [
            (
                torch.rand(n, 4, 4, generator=generator),
                (torch.rand(n, 4, 4, generator=generator) > 0.5).float(),
            )
        ]
        for n in (2, 3)
    ]
    reduced, doubled, whole, twice = reduced_and_concatenated(ThresholdSweepMeter, shards)
    assert reduced.n_images == whole.n_images == 5 and doubled.n_images == twice.n_images == 4
    for left, right in ((reduced, whole), (doubled, twice)):
        assert all(
            torch.equal(left.compute()[name], right.compute()[name])
            for name in ThresholdSweepMeter.METRICS
        )


def test_localization_meter_reduce_gives_the_meter_of_the_concatenated_data():
    # Dyadic values: every sum is exact, whatever the order of the additions.
    shards = [
        [(1.0, 0.5, True, {"loss": 2.0}, 0.25, 0.75), (0.25, 0.5, False, {"loss": 1.0}, 0.5, 0.5)],
        [(0.5, 0.125, True, {"loss": 0.5}, 0.75, 0.25)],
    ]
    reduced, doubled, whole, twice = reduced_and_concatenated(LocalizationMeter, shards)
    assert reduced.compute() == whole.compute() and doubled.compute() == twice.compute()
    assert reduced.compute()["n_images"] == 3 and reduced.compute()["top1_loc"] == pytest.approx(
        100 / 3
    )
