"""Plots: PNG files are written, readable and sized sensibly; what the figures show (panels,
limits, marks, lines, captions) and which test images they show; bad input fails clearly."""

import math

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from PIL import Image

from deepmil.engine import KeptRecords, score
from deepmil.metrics import MetricSettings
from deepmil.plots import (
    MISCLASSIFIED_COLOR,
    NO_TRUTH_TITLE,
    curve_panels,
    denormalize_image,
    learning_curves_figure,
    mask_panels_figure,
    outlier_limits,
    plot_learning_curves,
    plot_mask_histograms,
    save_mask_panels,
    score_histograms_figure,
)
from train_deepmil import prediction_samples

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width: int, min_height: int) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert min_width <= width <= 4000 and min_height <= height <= 6000
    assert pixels.std() > 0  # not a blank canvas


def make_history(n_epochs: int) -> list[dict]:
    history = []
    for epoch in range(n_epochs):
        history.append(
            {
                "epoch": epoch,
                "train_loss": 3.0 / (epoch + 1),
                "train_loss_pos": 1.0 / (epoch + 1),
                "train_loss_neg": 0.69,
                "train_loss_seg": 1.3 / (epoch + 1),
                "train_cl_error": 50.0 / (epoch + 1),
                "valid_loss": 3.2 / (epoch + 1),
                "valid_cl_error": 40.0 / (epoch + 1),
                "valid_f1_pos": 60.0 + epoch,
                "valid_f1_neg": 70.0 + epoch,
                "lr": 1e-3 if epoch < 20 else 1e-4,
            }
        )
    return history


def test_learning_curves_written(tmp_path):
    path = plot_learning_curves(make_history(25), tmp_path / "curves" / "train.png", 24, 10)
    assert path == tmp_path / "curves" / "train.png"
    assert_png(path, 800, 800)  # eight panels in two columns


def panel_titles(figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes if ax.get_visible()]


def test_one_panel_per_loss_and_train_valid_as_line_styles():
    panels = curve_panels(make_history(25))
    assert [panel.keys for panel in panels] == [
        ("train_loss", "valid_loss"),
        ("train_loss_seg",),
        ("train_loss_pos",),
        ("train_loss_neg",),
        ("train_cl_error", "valid_cl_error"),
        ("valid_f1_neg", "valid_f1_pos"),
        ("lr",),
    ]
    assert [panel.percent for panel in panels] == [False] * 4 + [True, True, False]
    total = learning_curves_figure(make_history(3)).axes[0]
    styles = {line.get_label(): (line.get_linestyle(), line.get_color()) for line in total.lines}
    assert styles["train"][0] == "-" and styles["valid"][0] == "--"
    assert styles["train"][1] == styles["valid"][1]  # one quantity, one colour
    assert [text.get_text() for text in total.get_legend().get_texts()] == ["train", "valid"]
    f1 = learning_curves_figure(make_history(3)).axes[5]
    assert f1.yaxis.get_major_formatter()(60, 0) == "60%"


def test_the_learning_rate_panel_is_dropped_iff_the_rate_is_constant():
    stepped = make_history(25)
    assert curve_panels(stepped)[-1].keys == ("lr",)
    assert "learning rate" in panel_titles(learning_curves_figure(stepped))
    constant = [entry | {"lr": 0.01} for entry in stepped]
    assert all("lr" not in panel.keys for panel in curve_panels(constant))
    figure = learning_curves_figure(constant)
    assert "learning rate" not in panel_titles(figure)
    assert figure.legends[0].get_title().get_text() == "constant learning rate: lr 0.01"
    assert len(panel_titles(figure)) == 6


def test_a_lone_outlier_does_not_stretch_the_axis():
    assert outlier_limits(np.array([1.0, 2.0, 3.0, 100.0])) == pytest.approx((0.84, 3.16))
    assert outlier_limits(np.array([1.0, 2.0, 3.0, 10.0])) is None  # within 5x the others
    assert outlier_limits(np.array([1.0, 285.0])) is None  # too few values to tell
    assert outlier_limits(np.array([np.nan, 0.5, 0.5, 0.5])) is None
    history = make_history(6)
    history[0]["valid_loss"] = 285.0  # e.g. the first validation of a GlaS-layout run
    total = learning_curves_figure(history).axes[0]
    low, high = total.get_ylim()
    assert high < 4 and low > 0
    assert "clipped" in total.get_title()
    marks = [line for line in total.lines if line.get_marker() == "^"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [0.0]
    assert [text.get_text() for text in total.texts] == ["285"]
    plain = learning_curves_figure(make_history(6)).axes[0]
    assert "clipped" not in plain.get_title() and plain.get_ylim()[1] > 3.2


def test_integer_epoch_ticks_and_the_selected_and_erasing_epochs_marked():
    figure = learning_curves_figure(make_history(3), selected_epoch=1, erasing_start=2)
    for ax in figure.axes:
        ticks = [tick for tick in ax.get_xticks() if -0.5 <= tick <= 2.5]
        assert ticks and all(float(tick).is_integer() for tick in ticks)
        vertical = [
            line.get_xdata()[0]
            for line in ax.lines
            if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2
        ]
        assert vertical == [1, 2]
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == ["selected epoch 1", "erasing from epoch 2", "train", "valid"]
    unmarked = learning_curves_figure(make_history(3), selected_epoch=0, erasing_start=5)
    assert [text.get_text() for text in unmarked.legends[0].get_texts()][:1] == ["selected epoch 0"]
    assert "erasing from epoch 5" not in [t.get_text() for t in unmarked.legends[0].get_texts()]


def test_learning_curves_partial_keys(tmp_path):
    history = [
        {"epoch": 0, "train_loss": 1.0},
        {"epoch": 1, "train_loss": 0.5, "valid_f1_pos": None},
    ]
    assert [panel.keys for panel in curve_panels(history)] == [("train_loss",)]
    path = plot_learning_curves(history, tmp_path / "partial.png")
    assert_png(path, 400, 200)


def test_learning_curves_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty history"):
        plot_learning_curves([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="no plottable key"):
        plot_learning_curves([{"epoch": 0, "name": 1}], tmp_path / "none.png")
    with pytest.raises(ValueError, match="no plottable key"):
        plot_learning_curves([{"epoch": 0, "valid_f1_pos": math.nan}], tmp_path / "nan.png")
    with pytest.raises(ValueError, match="entry 1: 'train_loss'"):
        plot_learning_curves([{"train_loss": 1.0}, {"train_loss": "x"}], tmp_path / "bad.png")
    assert not (tmp_path / "empty.png").exists()


def make_sample(seed: int, caption: str) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    gt = np.zeros((24, 32), dtype=np.uint8)
    gt[6:18, 8:20] = 1
    yy, xx = np.mgrid[0:24, 0:32]
    pred = 1.0 / (1.0 + np.exp(-(8.0 - np.hypot(yy - 12, xx - 15))))
    return {"image": image, "gt_mask": gt, "pred_mask": pred, "caption": caption}


def test_mask_panels_written(tmp_path):
    samples = [
        make_sample(0, "true: class_0 | pred: class_0 (93%) | F1+ 81.2 F1- 95.0"),
        make_sample(1, "true: class_1 | pred: class_0 (55%) | F1+ 40.0 F1- 88.8"),
    ]
    path = save_mask_panels(samples, tmp_path / "panels.png", title="synthetic test")
    assert_png(path, 800, 300)


def test_mask_panels_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no sample"):
        save_mask_panels([], tmp_path / "x.png")
    sample = make_sample(0, "c")
    sample["gt_mask"] = np.zeros((5, 5))
    with pytest.raises(ValueError, match="gt_mask"):
        save_mask_panels([sample], tmp_path / "x.png")
    sample = make_sample(0, "c")
    del sample["caption"]
    with pytest.raises(ValueError, match="caption"):
        save_mask_panels([sample], tmp_path / "x.png")


def test_mask_panels_with_crf_column(tmp_path):
    samples = [make_sample(seed, f"sample {seed}") for seed in range(2)]
    plain = save_mask_panels(samples, tmp_path / "plain.png")
    for sample in samples:
        sample["crf_mask"] = (sample["pred_mask"] >= 0.7).astype(np.float32)
    with_crf = save_mask_panels(samples, tmp_path / "crf.png", title="with CRF")
    assert_png(with_crf, 800, 300)
    with Image.open(plain) as a, Image.open(with_crf) as b:
        assert b.width == pytest.approx(a.width + 260, abs=2)  # one more 2.6-inch column
    del samples[1]["crf_mask"]
    with pytest.raises(ValueError, match="'crf_mask' given for 1 of 2"):
        save_mask_panels(samples, tmp_path / "x.png")
    samples[1]["crf_mask"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="sample 1 crf_mask"):
        save_mask_panels(samples, tmp_path / "x.png")


def row_axes(figure, row: int) -> list:
    return figure.subfigs[row].axes


def test_mask_panels_show_outlines_fills_colour_bar_and_captions():
    samples = [make_sample(0, "true a | predicted a"), make_sample(1, "true a | predicted b")]
    samples[1]["correct"] = False
    for sample in samples:
        sample["crf_mask"] = (sample["pred_mask"] >= 0.7).astype(np.float32)
        sample["crf_caption"] = "F1+ 50.0 F1- 90.0"
    figure = mask_panels_figure(samples, title="test predictions")
    for row in range(2):
        image, truth, prediction, continuous, crf, colour_bar = row_axes(figure, row)
        titles = [ax.get_title() for ax in (image, truth, prediction, continuous, crf)]
        assert titles == [
            "image",
            "ground truth",
            "prediction (R+ >= 0.5)",
            "continuous R+",
            "CRF-refined (>= 0.5)\nF1+ 50.0 F1- 90.0",
        ]
        for ax in (image, truth, prediction, continuous, crf):  # the ground-truth outline
            assert any(to_rgba("yellow") in map(tuple, c.get_edgecolor()) for c in ax.collections)
        for ax in (prediction, crf):  # the predicted region's outline
            assert any(to_rgba("red") in map(tuple, c.get_edgecolor()) for c in ax.collections)
        assert list(colour_bar.get_yticks()) == [0.0, 0.5, 1.0]
    captions = [subfigure._suptitle for subfigure in figure.subfigs]
    assert captions[0].get_text() == "true a | predicted a"
    assert captions[0].get_color() == "black"
    assert captions[1].get_color() == MISCLASSIFIED_COLOR


def test_mask_panels_of_an_image_without_ground_truth():
    sample = make_sample(0, "true a | predicted a | no mask")
    del sample["gt_mask"]
    figure = mask_panels_figure([sample])
    axes = row_axes(figure, 0)
    assert axes[1].get_title() == NO_TRUTH_TITLE
    for ax in axes[:4]:
        assert not any(to_rgba("yellow") in map(tuple, c.get_edgecolor()) for c in ax.collections)


def test_mask_histograms(tmp_path):
    rng = np.random.default_rng(0)
    inside = rng.beta(5, 2, 2000)
    outside = torch.from_numpy(rng.beta(2, 5, 5000))
    path = plot_mask_histograms(inside, outside, tmp_path / "hist" / "values.png")
    assert_png(path, 500, 300)
    log_path = plot_mask_histograms(
        inside, outside, tmp_path / "log.png", bins=20, log_y=True, title="test set"
    )
    assert_png(log_path, 500, 300)
    with pytest.raises(ValueError, match="outside the ground truth"):
        plot_mask_histograms(inside, np.array([]), tmp_path / "x.png")
    with pytest.raises(ValueError, match="inside the ground truth"):
        plot_mask_histograms(np.array([0.5, 1.2]), outside, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_denormalize_image():
    tensor = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 2, 2).expand(3, 2, 2)
    image = denormalize_image(tensor)
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    assert image[..., 0].tolist() == [[0, 128], [255, 255]]
    with pytest.raises(ValueError, match="3xHxW"):
        denormalize_image(torch.zeros(1, 3, 2, 2))


def test_score_histograms_from_counts(tmp_path):
    from deepmil.plots import plot_score_histograms

    counts = np.array([[5, 3, 0, 2], [0, 1, 4, 5]])
    path = plot_score_histograms(counts, tmp_path / "h.png")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="both rows"):
        plot_score_histograms(np.array([[1, 2], [0, 0]]), tmp_path / "bad.png")


def vertical_lines(ax) -> dict[str, float]:
    return {line.get_label(): line.get_xdata()[0] for line in ax.lines}


def test_score_histograms_mark_0_5_and_the_best_threshold():
    counts = np.array([[5, 3, 0, 2], [0, 1, 4, 5]])
    ax = score_histograms_figure(counts, best_threshold=0.37).axes[0]
    assert vertical_lines(ax) == {
        "threshold 0.5 (F1+, F1-, IoU)": 0.5,
        "best validation threshold 0.37": 0.37,
    }
    for threshold in (None, math.nan):  # no validation masks: only the default threshold
        ax = score_histograms_figure(counts, best_threshold=threshold).axes[0]
        assert list(vertical_lines(ax).values()) == [0.5]


# ----------------------------------------------------------------------------- the images shown


def item(index: int, f1_pos: float | None, correct: bool) -> tuple[dict, dict]:
    """A hand-built prediction and its per-image numbers."""
    return {"index": index, "mask": torch.zeros(1, 2, 2)}, {"f1_pos": f1_pos, "correct": correct}


def test_kept_records_are_the_first_then_misclassified_then_the_worst_by_f1():
    kept = KeptRecords(first=2, misclassified=2, worst=4)
    f1 = [0.1, 0.9, 0.8, 0.2, 0.5, 0.3, 0.2, None, 0.05, 0.7, 0.2]
    wrong = {0, 3, 5, 9}
    for index, value in enumerate(f1):
        kept.offer(*item(index, value, index not in wrong))
        assert len(kept.records) <= 8  # bounded whatever the set's size
    chosen = [(record["index"], record["kept"]) for record in kept.records]
    # the 4 lowest F1+ are images 8, 0, 3 and 6 (6 and 10 tie at 0.2: the lower index);
    # 0 and 3 are shown already, 7 has no ground truth
    assert chosen == [
        (0, "first"),
        (1, "first"),
        (3, "misclassified"),
        (5, "misclassified"),
        (8, "lowest F1+"),
        (6, "lowest F1+"),
    ]
    assert kept.records[0]["mask"].device.type == "cpu" and kept.records[0]["f1_pos"] == 0.1
    nothing = KeptRecords()
    nothing.offer(*item(0, 0.0, False))
    assert nothing.records == []


def test_scoring_keeps_the_worst_images_by_their_f1():
    truth = torch.zeros(1, 4, 4)
    truth[:, :2] = 1
    masks = [truth.clone(), 1 - truth, truth.clone(), torch.ones(1, 4, 4)]  # F1+ 1, 0, 1, 2/3
    stream = [
        {
            "index": index,
            "label": 0,
            "predicted": 0,
            "probability": 0.9,
            "head_predicted": {},
            "losses": {"loss": 1.0},
            "mask": mask,
            "truth": truth,
        }
        for index, mask in enumerate(masks)
    ]
    records = score(stream, MetricSettings(), KeptRecords(first=1, worst=2)).records
    assert [(record["index"], record["kept"]) for record in records] == [
        (0, "first"),
        (1, "lowest F1+"),
        (3, "lowest F1+"),
    ]
    assert records[2]["f1_pos"] == pytest.approx(2 / 3)


class Images:
    """The part of a dataset that ``prediction_samples`` reads."""

    def original_image(self, index: int) -> np.ndarray:
        return np.full((2, 2, 3), index, dtype=np.uint8)


def record(index: int, kept: str, truth: bool = True, crf: bool = False) -> dict:
    out = {
        "index": index,
        "kept": kept,
        "label": 0,
        "predicted": 1,
        "probability": 0.734,
        "correct": False,
        "mask": torch.full((1, 2, 2), 0.25),
        "truth": torch.ones(1, 2, 2) if truth else None,
        "f1_pos": 0.5 if truth else None,
        "f1_neg": 0.25 if truth else None,
    }
    if crf:
        out |= {"crf_mask": torch.ones(1, 2, 2), "crf_f1_pos": 0.75, "crf_f1_neg": 0.125}
    return out


def test_prediction_samples_name_the_classes_and_why_each_image_is_shown():
    encoding = {"cat": 0, "dog": 1}
    records = [record(0, "first", crf=True), record(7, "lowest F1+", crf=True)]
    records.append(record(9, "misclassified", truth=False, crf=True))
    first, worst, misclassified = prediction_samples(records, Images(), encoding)
    assert first["caption"] == "true cat | predicted dog (73%) | F1+ 50.0 F1- 25.0"
    assert worst["caption"] == "lowest F1+ | true cat | predicted dog (73%) | F1+ 50.0 F1- 25.0"
    assert misclassified["caption"] == "misclassified | true cat | predicted dog (73%) | no mask"
    assert first["crf_caption"] == "F1+ 75.0 F1- 12.5" and "crf_caption" not in misclassified
    assert "gt_mask" not in misclassified and first["correct"] is False
    assert [sample["index"] for sample in (first, worst, misclassified)] == [0, 7, 9]
    assert (worst["image"] == 7).all() and worst["pred_mask"].shape == (2, 2)
