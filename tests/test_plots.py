"""Plots: PNG files are written, readable and sized sensibly; bad input fails clearly."""

import numpy as np
import pytest
import torch
from PIL import Image

from deepmil.plots import (
    denormalize_image,
    plot_learning_curves,
    plot_mask_histograms,
    save_mask_panels,
)

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
    path = plot_learning_curves(make_history(25), tmp_path / "curves" / "train.png")
    assert path == tmp_path / "curves" / "train.png"
    assert_png(path, 400, 800)  # four groups stacked


def test_learning_curves_partial_keys(tmp_path):
    history = [
        {"epoch": 0, "train_loss": 1.0},
        {"epoch": 1, "train_loss": 0.5, "valid_f1_pos": None},
    ]
    path = plot_learning_curves(history, tmp_path / "partial.png")
    assert_png(path, 400, 200)


def test_learning_curves_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty history"):
        plot_learning_curves([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="no plottable key"):
        plot_learning_curves([{"epoch": 0, "name": 1}], tmp_path / "none.png")
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
        assert b.width == pytest.approx(a.width * 5 / 4, rel=0.02)  # one more 3-inch column
    del samples[1]["crf_mask"]
    with pytest.raises(ValueError, match="'crf_mask' given for 1 of 2"):
        save_mask_panels(samples, tmp_path / "x.png")
    samples[1]["crf_mask"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="sample 1 crf_mask"):
        save_mask_panels(samples, tmp_path / "x.png")


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
