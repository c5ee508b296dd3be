"""Tests of the synthetic dataset generator."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from deepmil.synthetic import (
    MAX_FOREGROUND,
    MIN_FOREGROUND,
    SyntheticSpec,
    ensure_synthetic_dataset,
    read_metadata,
    render_sample,
)

SMALL = SyntheticSpec(image_size=48, n_train=8, n_test=4)


def _file_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(path for path in root.rglob("*") if path.is_file())
    return {str(path.relative_to(root)): path.read_bytes() for path in files}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*")}


def test_generation_is_deterministic_and_depends_on_the_seed(tmp_path):
    assert ensure_synthetic_dataset(tmp_path / "a", SMALL)
    assert ensure_synthetic_dataset(tmp_path / "b", SMALL)
    first, second = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert first == second
    reseeded = SyntheticSpec(image_size=48, n_train=8, n_test=4, seed=1)
    ensure_synthetic_dataset(tmp_path / "c", reseeded)
    other = _file_bytes(tmp_path / "c")
    images = [name for name in first if name.startswith("images/")]
    assert all(first[name] != other[name] for name in images)


def test_each_image_depends_only_on_seed_set_and_index():
    larger = SyntheticSpec(image_size=48, n_train=20, n_test=9)
    for set_name, index in (("train", 3), ("test", 2)):
        small, large = render_sample(SMALL, set_name, index), render_sample(larger, set_name, index)
        assert np.array_equal(small.image, large.image)


def test_idempotent_and_regenerated_when_the_spec_changes(tmp_path):
    root = tmp_path / "synthetic"
    assert ensure_synthetic_dataset(root, SMALL)
    before = _mtimes(root)
    assert not ensure_synthetic_dataset(root, SMALL)
    assert _mtimes(root) == before
    changed = SyntheticSpec(image_size=48, n_train=8, n_test=2)
    assert ensure_synthetic_dataset(root, changed)
    assert (root / "spec.json").read_text() == changed.to_json()
    rows = read_metadata(root)
    assert len(rows) == 10
    listed = {row[key] for row in rows for key in ("image", "mask")}
    on_disk = {name for name in _file_bytes(root) if name.startswith(("images/", "masks/"))}
    assert on_disk == listed
    assert not list(tmp_path.glob(".synthetic.*"))


def test_incomplete_folder_is_regenerated_and_foreign_folder_refused(tmp_path):
    root = tmp_path / "synthetic"
    ensure_synthetic_dataset(root, SMALL)
    (root / "images" / "test_00001.png").unlink()
    assert ensure_synthetic_dataset(root, SMALL)
    assert (root / "images" / "test_00001.png").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="no spec.json"):
        ensure_synthetic_dataset(foreign, SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_metadata_layout_and_file_formats(tmp_path):
    root = tmp_path / "synthetic"
    spec = SyntheticSpec(num_classes=3, image_size=40, n_train=9, n_test=6)
    ensure_synthetic_dataset(root, spec)
    assert (root / "metadata.csv").read_text().splitlines()[:2] == [
        "image,mask,class,set",
        "images/train_00000.png,masks/train_00000.png,class_0,train",
    ]
    rows = read_metadata(root)
    for set_name, count in (("train", 9), ("test", 6)):
        classes = [row["class"] for row in rows if row["set"] == set_name]
        assert len(classes) == count
        assert {name: classes.count(name) for name in set(classes)} == {
            f"class_{c}": count // 3 for c in range(3)
        }
    for row in rows:
        image, mask = Image.open(root / row["image"]), Image.open(root / row["mask"])
        assert (image.mode, image.size, mask.mode, mask.size) == ("RGB", (40, 40), "L", (40, 40))
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}


def test_masks_are_the_union_of_the_objects_and_cover_the_stated_range(tmp_path):
    spec = SyntheticSpec(image_size=64, n_train=40, n_test=4, min_objects=1, max_objects=4)
    for index in range(40):
        sample = render_sample(spec, "train", index)
        assert 1 <= len(sample.objects) <= 4
        assert np.array_equal(sample.mask, np.logical_or.reduce(sample.objects))
        assert MIN_FOREGROUND <= sample.mask.mean() <= MAX_FOREGROUND
    root = tmp_path / "synthetic"
    ensure_synthetic_dataset(root, SMALL)
    saved = np.asarray(Image.open(root / "masks" / "train_00005.png"))
    assert np.array_equal(saved == 255, render_sample(SMALL, "train", 5).mask)


def _orientation_ratio(image: np.ndarray, region: np.ndarray) -> float:
    """(E_x - E_y) / (E_x + E_y) of squared x / y differences summed over ``region``."""
    pixels = image.astype(np.float64)
    gx = np.diff(pixels, axis=1)[:-1] ** 2
    gy = np.diff(pixels, axis=0)[:, :-1] ** 2
    inside = region[:-1, :-1]
    energy_x, energy_y = gx.sum(axis=-1)[inside].sum(), gy.sum(axis=-1)[inside].sum()
    return (energy_x - energy_y) / (energy_x + energy_y)


def _effect_size(first: list[float], second: list[float]) -> float:
    a, b = np.asarray(first), np.asarray(second)
    return abs(a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2)


def test_class_evidence_lies_only_inside_the_objects():
    """Orientation statistic computed separately on background and foreground pixels.

    For each image, E_x and E_y are the summed squared horizontal and vertical intensity differences
    over a pixel set, and r = (E_x - E_y) / (E_x + E_y) is in [-1, 1] (+1: only vertical structure,
    -1: only horizontal structure). Class 0 objects carry horizontal bands and class 1 objects
    vertical bands, so on foreground pixels (mask eroded by 2 px, to drop object edges) r separates
    the classes by many standard deviations. On background pixels (complement of the mask dilated by
    2 px) only class-neutral content remains, so the class-conditional means of r must agree: their
    difference, in units of the pooled standard deviation (Cohen's d), stays below 0.5 (with 100
    images per class, d of two identical distributions has a standard error of about 0.14).
    """
    spec = SyntheticSpec(image_size=64, n_train=200, n_test=2)
    background: dict[int, list[float]] = {0: [], 1: []}
    foreground: dict[int, list[float]] = {0: [], 1: []}
    for index in range(200):
        sample = render_sample(spec, "train", index)
        inner = ndimage.binary_erosion(sample.mask, iterations=2)
        outer = ~ndimage.binary_dilation(sample.mask, iterations=2)
        background[sample.label].append(_orientation_ratio(sample.image, outer))
        foreground[sample.label].append(_orientation_ratio(sample.image, inner))
    assert _effect_size(background[0], background[1]) < 0.5
    assert abs(np.mean(background[0])) < 0.05 and abs(np.mean(background[1])) < 0.05
    assert _effect_size(foreground[0], foreground[1]) > 5.0
    assert np.mean(foreground[0]) < -0.5 < 0.5 < np.mean(foreground[1])


def test_five_classes_are_balanced_and_textured_differently():
    spec = SyntheticSpec(num_classes=5, image_size=64, n_train=10, n_test=5)
    samples = [render_sample(spec, "train", index) for index in range(10)]
    assert [sample.label for sample in samples] == [0, 1, 2, 3, 4] * 2
    inner = [ndimage.binary_erosion(sample.mask, iterations=2) for sample in samples]
    ratios = [_orientation_ratio(sample.image, region) for sample, region in zip(samples, inner)]
    assert ratios[0] < -0.5 and ratios[1] > 0.5 and abs(ratios[2]) < 0.3


def test_spec_from_config_and_validation():
    assert SyntheticSpec.from_config(None) == SyntheticSpec()
    expected = SyntheticSpec(num_classes=3, seed=4)
    assert SyntheticSpec.from_config({"num_classes": 3, "seed": 4}) == expected
    with pytest.raises(ValueError, match="unknown key"):
        SyntheticSpec.from_config({"classes": 2})
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSpec(num_classes=9)
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticSpec(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticSpec(image_size=16)
    with pytest.raises(ValueError, match="must be an integer"):
        SyntheticSpec(n_train=10.5)
