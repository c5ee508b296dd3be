"""Dense CRF: parameter sets, input checks, refinement along colour edges, worker pool, imports."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import crf_params
import tools
from deepmil.crf import CRF, refine_with_crf


def two_region_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """32 x 48 image: dark left, bright right (the object); a weak, noisy foreground map that
    is 0.4 on the left and 0.6 on the right with 15% of its pixels flipped (0.6 <-> 0.4)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((32, 48), dtype=bool)
    truth[:, 24:] = True
    image = np.where(truth[..., None], 200, 40) + rng.integers(-10, 11, (32, 48, 3))
    mask = np.where(truth, 0.6, 0.4)
    flips = rng.random(truth.shape) < 0.15
    mask[flips] = 1.0 - mask[flips]
    return image.astype(np.uint8), mask.astype(np.float32), truth


def test_parameter_sets_and_dataset_mapping():
    assert crf_params.DEFAULT == (5, (3, 3), (80, 80), (13, 13, 13))
    assert crf_params.GLAS == (2, (3, 3), (13, 13), (3, 3, 3))
    assert crf_params.CUB == (5, (5, 5), (19, 19), (11, 11, 11))
    assert crf_params.params_for("glas") is crf_params.GLAS
    assert crf_params.params_for("Caltech-UCSD-Birds-200-2011") is crf_params.CUB
    assert crf_params.params_for("Oxford-flowers-102") is crf_params.CUB
    assert crf_params.params_for("synthetic") is crf_params.CUB
    with pytest.raises(ValueError, match="unknown dataset 'bach'"):
        crf_params.params_for("bach")


@pytest.mark.parametrize("params", [crf_params.DEFAULT, crf_params.GLAS, crf_params.CUB])
def test_crf_snaps_a_noisy_map_to_the_colour_edge(params):
    image, mask, truth = two_region_case()
    refined = CRF(params)(image, mask)
    assert refined.dtype == np.float32 and refined.shape == mask.shape
    assert refined.min() >= 0 and refined.max() <= 1
    image.flags.writeable = False  # as np.asarray(PIL image) gives
    assert np.array_equal(CRF(params)(image, mask), refined)
    assert ((mask >= 0.5) == truth).mean() == pytest.approx(0.85, abs=0.02)
    assert ((refined >= 0.5) == truth).mean() > 0.99


@pytest.mark.parametrize("params", [crf_params.DEFAULT, crf_params.GLAS, crf_params.CUB])
def test_confident_square_kept_on_its_colour_edge_erased_on_a_flat_image(params):
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    mask = np.full((16, 16), 0.018, dtype=np.float32)  # the range of R+
    mask[4:12, 4:12] = 0.982
    # Without a colour edge the pairwise terms (compatibilities 3 and 10) outweigh the unary.
    assert CRF(params)(image, mask).max() < 0.01
    image[4:12, 4:12] = 30
    assert np.array_equal(CRF(params)(image, mask) >= 0.5, mask >= 0.5)


def test_infer_returns_normalised_probabilities():
    image, mask, _ = two_region_case()
    # float32 rounding: 1 - p + p is not exactly 1, well within the tolerance.
    probabilities = np.stack([1 - mask, mask]).astype(np.float32) * np.float32(1 + 1e-5)
    refined = CRF(crf_params.GLAS).infer(image, probabilities)
    assert refined.shape == (2, 32, 48) and refined.dtype == np.float32
    assert np.allclose(refined.sum(axis=0), 1.0, atol=1e-5)
    assert np.allclose(refined[1], CRF(crf_params.GLAS)(image, mask), atol=1e-6)


def test_input_checks():
    image, mask, _ = two_region_case()
    crf = CRF()
    with pytest.raises(ValueError, match="sum to 1"):
        crf.infer(image, np.stack([mask, mask]))
    with pytest.raises(ValueError, match="uint8"):
        crf(image.astype(np.float32), mask)
    with pytest.raises(ValueError, match="do not fit"):
        crf(image, mask[:, :40])
    with pytest.raises(ValueError, match="do not fit"):
        crf.infer(image, mask)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        crf(image, mask + 1)


def test_pool_matches_in_process_and_keeps_order():
    cases = [two_region_case(seed) for seed in range(5)]
    crf = pickle.loads(pickle.dumps(CRF(crf_params.CUB)))
    items = [(f"image {i}", image, mask) for i, (image, mask, _) in enumerate(cases)]
    serial = list(refine_with_crf(crf, items, workers=0))
    pooled = list(refine_with_crf(crf, iter(items), workers=2))
    assert [key for key, _ in pooled] == [f"image {i}" for i in range(5)]
    for (_, a), (_, b) in zip(serial, pooled):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="workers"):
        next(refine_with_crf(crf, items, workers=-1))


def negate(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return image[..., 0] - mask


def test_refine_with_crf_stream_order():
    items = (
        (index, np.full((2, 2, 3), index, dtype=np.float32), np.ones((2, 2))) for index in range(7)
    )
    out = list(refine_with_crf(negate, items, workers=2))
    assert [key for key, _ in out] == list(range(7))
    assert [float(mask[0, 0]) for _, mask in out] == [index - 1.0 for index in range(7)]


def test_tools_crf_is_the_light_deepmil_crf():
    assert tools.CRF is CRF and CRF.__module__ == "deepmil.crf"  # what worker processes import
    code = (
        "import sys, deepmil.crf; "
        "print(sorted(m for m in sys.modules if m.startswith(('deepmil', 'torch', 'tools'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.strip()
    assert loaded == "['deepmil', 'deepmil.crf', 'deepmil.errors', 'deepmil.registry']"
