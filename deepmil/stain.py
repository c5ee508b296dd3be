"""Stain tools for H&E images (method §6.9): optical density, Vahadane stain separation with
SPAMS, stain normalisation and stain augmentation. Optional; not used by the paper's runs.

Images are ``H x W x 3`` uint8 RGB arrays. A stain matrix is ``2 x 3``: one unit-norm optical
density (OD) vector per stain, hematoxylin (the larger red OD) first. Concentrations are
``H x W x 2`` and ``OD = concentrations @ stain_matrix``.
"""

from __future__ import annotations

import numpy as np
import spams

OD_FLOOR = 1e-6
TISSUE_LUMINOSITY = 0.8
DICTIONARY_LAMBDA = 0.1
DICTIONARY_ITERATIONS = 100
LASSO_LAMBDA = 0.01
PERCENTILE = 99


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"stain tools need an HxWx3 uint8 RGB image, got shape {image.shape} "
            f"dtype {image.dtype}"
        )
    return image


def rgb_to_od(image: np.ndarray) -> np.ndarray:
    """Optical density ``-log(I / 255)`` (zeros read as 1, floor 1e-6), float64 ``H x W x 3``."""
    intensity = np.maximum(_check_image(image), 1).astype(np.float64)
    return np.maximum(-np.log(intensity / 255.0), OD_FLOOR)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`: ``255 exp(-OD)`` rounded to uint8."""
    return np.clip(np.rint(255.0 * np.exp(-np.asarray(od))), 0, 255).astype(np.uint8)


def tissue_mask(image: np.ndarray, threshold: float = TISSUE_LUMINOSITY) -> np.ndarray:
    """Pixels whose CIELAB lightness ``L*/100`` is below ``threshold`` (not white background)."""
    rgb = _check_image(image) / 255.0
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    luminance = linear @ np.array([0.2126, 0.7152, 0.0722])
    edge = (6 / 29) ** 3
    f = np.where(luminance > edge, np.cbrt(luminance), luminance / (3 * (6 / 29) ** 2) + 4 / 29)
    return (116 * f - 16) / 100 < threshold


def vahadane_stain_matrix(image: np.ndarray) -> np.ndarray:
    """Stain matrix by sparse non-negative dictionary learning (SPAMS ``trainDL``: 2 atoms,
    lambda 0.1, positive atoms and codes, fixed iteration count) on the tissue pixels' OD."""
    od = rgb_to_od(image)[tissue_mask(image)]
    if len(od) < 2:
        raise ValueError("vahadane_stain_matrix: fewer than 2 tissue pixels")
    dictionary = spams.trainDL(
        np.asfortranarray(od.T),
        K=2,
        lambda1=DICTIONARY_LAMBDA,
        mode=2,
        modeD=0,
        posAlpha=True,
        posD=True,
        iter=DICTIONARY_ITERATIONS,
        numThreads=1,
        verbose=False,
    )
    stains = dictionary.T / np.linalg.norm(dictionary.T, axis=1, keepdims=True)
    return stains[np.argsort(-stains[:, 0], kind="stable")]


def stain_concentrations(image: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """``H x W x 2`` non-negative concentrations by SPAMS positive Lasso (lambda 0.01)."""
    od = rgb_to_od(image)
    codes = spams.lasso(
        np.asfortranarray(od.reshape(-1, 3).T),
        D=np.asfortranarray(np.asarray(stain_matrix, dtype=np.float64).T),
        mode=2,
        lambda1=LASSO_LAMBDA,
        pos=True,
        numThreads=1,
    )
    return codes.toarray().T.reshape(*od.shape[:2], 2)


def stains_to_rgb(concentrations: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Recombine ``H x W x 2`` concentrations with a stain matrix into a uint8 RGB image."""
    return od_to_rgb(concentrations @ stain_matrix)


class StainNormalizer:
    """Vahadane normalisation towards a target image: the source's concentrations are scaled
    per stain by the ratio of the target's to the source's 99th percentiles and recombined
    with the target's stain matrix."""

    def __init__(self) -> None:
        self.stain_matrix: np.ndarray | None = None
        self.max_concentrations: np.ndarray | None = None

    def fit(self, target: np.ndarray) -> StainNormalizer:
        """Learn the target's stain matrix and 99th-percentile concentrations."""
        self.stain_matrix = vahadane_stain_matrix(target)
        concentrations = stain_concentrations(target, self.stain_matrix)
        self.max_concentrations = np.percentile(concentrations.reshape(-1, 2), PERCENTILE, axis=0)
        return self

    def transform(self, image: np.ndarray) -> np.ndarray:
        """The image with the target's stain colours and concentration range."""
        if self.stain_matrix is None:
            raise ValueError("StainNormalizer.transform: call fit(target) first")
        concentrations = stain_concentrations(image, vahadane_stain_matrix(image))
        source_max = np.percentile(concentrations.reshape(-1, 2), PERCENTILE, axis=0)
        scale = self.max_concentrations / np.maximum(source_max, OD_FLOOR)
        return stains_to_rgb(concentrations * scale, self.stain_matrix)


class StainAugmentor:
    """Random stain perturbation: per stain, concentrations are multiplied by
    ``U(1 - scale, 1 + scale)`` and shifted by ``U(-shift, shift)`` (two scales, then two shifts
    drawn from the given generator). With ``tissue_only`` the background keeps its pixels."""

    def __init__(self, scale: float = 0.2, shift: float = 0.2, tissue_only: bool = True) -> None:
        self.scale = scale
        self.shift = shift
        self.tissue_only = tissue_only

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = _check_image(image)
        stain_matrix = vahadane_stain_matrix(image)
        concentrations = stain_concentrations(image, stain_matrix)
        factors = rng.uniform(1 - self.scale, 1 + self.scale, size=2)
        offsets = rng.uniform(-self.shift, self.shift, size=2)
        augmented = stains_to_rgb(concentrations * factors + offsets, stain_matrix)
        if self.tissue_only:
            return np.where(tissue_mask(image)[..., None], augmented, image)
        return augmented
