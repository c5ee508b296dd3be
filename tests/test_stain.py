"""Stain tools on a synthetic two-stain image with known stain vectors."""

import numpy as np
import pytest

from deepmil.registry import dataset_spec
from deepmil.stain import (
    StainAugmentor,
    StainNormalizer,
    od_to_rgb,
    rgb_to_od,
    stain_concentrations,
    tissue_mask,
    vahadane_stain_matrix,
)

HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])
STAINS = np.stack([HEMATOXYLIN / np.linalg.norm(HEMATOXYLIN), EOSIN / np.linalg.norm(EOSIN)])


def two_stain_image(seed: int = 0, size: int = 48) -> np.ndarray:
    """Random, often single-stain concentrations in [0.2, 1.5] mixed with the two stains."""
    rng = np.random.default_rng(seed)
    concentrations = rng.uniform(0.2, 1.5, (size, size, 2)) * (rng.random((size, size, 2)) < 0.6)
    concentrations[0, 0] = 0.8  # at least one tissue pixel per stain
    return od_to_rgb(concentrations @ STAINS)


def test_od_round_trip_and_floor():
    image = np.array([[[0, 1, 255], [128, 64, 32]]], dtype=np.uint8)
    od = rgb_to_od(image)
    assert od[0, 0, 0] == pytest.approx(np.log(255))  # 0 is read as 1
    assert od[0, 0, 2] == 1e-6
    assert od[0, 1, 0] == pytest.approx(-np.log(128 / 255))
    assert np.array_equal(od_to_rgb(od)[0, 1], image[0, 1])


def test_tissue_mask_white_is_background():
    image = np.array([[[255, 255, 255], [240, 240, 240], [120, 60, 140]]], dtype=np.uint8)
    # L* of 240 grey is about 94.6 (background), of the purple about 36 (tissue).
    assert tissue_mask(image).tolist() == [[False, False, True]]


def test_vahadane_recovers_the_two_stains():
    estimated = vahadane_stain_matrix(two_stain_image())
    assert estimated.shape == (2, 3)
    assert np.allclose(np.linalg.norm(estimated, axis=1), 1.0)
    cosine = estimated @ STAINS.T
    # Hematoxylin is put first (larger red OD), so the order matches.
    assert cosine[0, 0] > 0.95 and cosine[1, 1] > 0.95


def test_concentrations_reconstruct_the_image():
    image = two_stain_image()
    concentrations = stain_concentrations(image, STAINS)
    assert concentrations.shape == (48, 48, 2) and concentrations.min() >= 0
    rebuilt = od_to_rgb(concentrations @ STAINS)
    assert np.abs(rebuilt.astype(int) - image).mean() < 2.0


def test_normalizing_an_image_to_itself_changes_it_little():
    image = two_stain_image()
    normalized = StainNormalizer().fit(image).transform(image)
    assert normalized.dtype == np.uint8 and normalized.shape == image.shape
    assert np.abs(normalized.astype(int) - image).mean() < 3.0  # measured 1.9 grey levels


def test_normalizer_moves_towards_the_target():
    target = two_stain_image(seed=1)
    source = od_to_rgb(rgb_to_od(two_stain_image(seed=2)) * 0.5)  # a paler source
    normalized = StainNormalizer().fit(target).transform(source)
    assert abs(normalized.mean() - target.mean()) < 0.25 * abs(source.mean() - target.mean())
    with pytest.raises(ValueError, match="fit"):
        StainNormalizer().transform(source)


def test_augmentor_is_seeded_and_bounded():
    image = two_stain_image()
    augment = StainAugmentor()
    first = augment(image, np.random.default_rng(3))
    again = augment(image, np.random.default_rng(3))
    other = augment(image, np.random.default_rng(4))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    difference = np.abs(first.astype(int) - image)
    assert 1.0 < difference.mean() < 30.0
    still = StainAugmentor(scale=0.0, shift=0.0)(image, np.random.default_rng(0))
    assert np.abs(still.astype(int) - image).mean() < 3.0  # Lasso shrinkage only


def test_augmentor_keeps_the_background():
    image = two_stain_image()
    image[:8] = 255
    augmented = StainAugmentor(tissue_only=True)(image, np.random.default_rng(0))
    assert np.array_equal(augmented[:8], image[:8])


def test_bad_image():
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_od(np.zeros((4, 4, 3)))


def test_training_pipeline_applies_stain_augmentation_reproducibly(tmp_path):
    import torch
    from PIL import Image

    import loader

    Image.fromarray(two_stain_image(size=48)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((48, 48), dtype=np.uint8)).save(tmp_path / "a_mask.png")
    rows = [loader.FoldRow("a.png", "a_mask.png", "benign")]

    def dataset(stain: bool) -> loader.PhotoDataset:
        return loader.PhotoDataset(
            rows,
            tmp_path,
            {"benign": 0, "malignant": 1},
            dataset_spec("glas"),
            train=True,
            crop_size=48,
            padding_size=[0.5, 0.5],
            seed=3,
            stain_augmentation=stain,
        )

    plain, stained = dataset(False)[0]["image"], dataset(True)[0]["image"]
    assert torch.equal(dataset(True)[0]["image"], stained)
    assert not torch.equal(plain, stained)
    assert stained.min() >= -1 and stained.max() <= 1
