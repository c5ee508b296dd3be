"""Dense-CRF refinement of soft masks with the colours of their image (pydensecrf), in this
process or over a stream of images in worker processes.

Imports only NumPy and ``crf_params`` (pydensecrf when a CRF runs), so worker processes that
unpickle a :class:`CRF` stay light.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import numpy as np

from crf_params import DEFAULT, CRFParams

Key = TypeVar("Key")


class CRF:
    """Dense CRF (pydensecrf) refining soft segmentation maps with the colours of their image.

    Unary energy ``-log p``; a Gaussian pairwise term (spatial std ``sxy_gaussian``,
    compatibility 3) and a bilateral one (spatial std ``sxy_bilateral``, colour std
    ``srgb_bilateral``, compatibility 10), both with diagonal kernels and symmetric
    normalisation; ``n_iter`` mean-field iterations. Instances are picklable (worker processes).

    Example::

        from crf_params import params_for
        crf = CRF(params_for("glas"))
        refined = crf(image, mask)  # HxWx3 uint8 image, HxW mask in [0, 1] -> HxW float32
        prediction = refined >= 0.5
    """

    GAUSSIAN_COMPAT = 3
    BILATERAL_COMPAT = 10
    SUM_TOLERANCE = 1e-3
    PROB_FLOOR = 1e-8

    def __init__(self, params: CRFParams = DEFAULT) -> None:
        self.params = params

    def infer(self, image: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """Refine ``c x H x W`` class probabilities (summing to 1 over ``c`` within
        ``SUM_TOLERANCE``; renormalised) of an ``H x W x 3`` uint8 image; returns ``c x H x W``
        float32 probabilities."""
        image = np.asarray(image)
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"CRF: image must be an HxWx3 uint8 array, got shape {image.shape} "
                f"dtype {image.dtype}"
            )
        fits = probabilities.ndim == 3 and probabilities.shape[1:] == image.shape[:2]
        if not fits or len(probabilities) < 2:
            raise ValueError(
                f"CRF: probabilities of shape {probabilities.shape} do not fit an "
                f"image of size {image.shape[:2]} (need c >= 2 x H x W)"
            )
        n_labels, height, width = probabilities.shape
        total = probabilities.sum(axis=0)
        if not (probabilities.min() >= 0 and np.abs(total - 1).max() <= self.SUM_TOLERANCE):
            raise ValueError(
                f"CRF: probabilities must be >= 0 and sum to 1 over classes "
                f"(sums in [{total.min()}, {total.max()}])"
            )
        probabilities = np.clip(probabilities / total, self.PROB_FLOOR, 1.0)
        unary = np.ascontiguousarray(-np.log(probabilities).reshape(n_labels, -1), dtype=np.float32)
        from pydensecrf import densecrf  # imported here: training does not need it

        model = densecrf.DenseCRF2D(width, height, n_labels)
        model.setUnaryEnergy(unary)
        model.addPairwiseGaussian(
            sxy=self.params.sxy_gaussian,
            compat=self.GAUSSIAN_COMPAT,
            kernel=densecrf.DIAG_KERNEL,
            normalization=densecrf.NORMALIZE_SYMMETRIC,
        )
        model.addPairwiseBilateral(
            sxy=self.params.sxy_bilateral,
            srgb=self.params.srgb_bilateral,
            rgbim=np.array(image, order="C"),  # writable copy
            compat=self.BILATERAL_COMPAT,
            kernel=densecrf.DIAG_KERNEL,
            normalization=densecrf.NORMALIZE_SYMMETRIC,
        )
        refined = np.asarray(model.inference(self.params.n_iter), dtype=np.float32)
        return refined.reshape(n_labels, height, width)

    def __call__(self, image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """Refine an ``H x W`` foreground probability map (values in [0, 1]) of an
        ``H x W x 3`` uint8 image; returns the refined ``H x W`` float32 foreground map."""
        foreground = np.asarray(foreground, dtype=np.float64)
        if foreground.ndim != 2 or not (foreground.min() >= 0 and foreground.max() <= 1):
            raise ValueError(
                f"CRF: the foreground map must be HxW with values in [0, 1], got "
                f"shape {foreground.shape}"
            )
        return self.infer(image, np.stack([1 - foreground, foreground]))[1]


def refine_with_crf(
    crf: Callable[[np.ndarray, np.ndarray], np.ndarray],
    items: Iterable[tuple[Key, np.ndarray, np.ndarray]],
    workers: int = 0,
) -> Iterator[tuple[Key, np.ndarray]]:
    """Apply ``crf(image, mask)`` (e.g. :class:`CRF`) to ``(key, image, mask)`` items.

    Yields ``(key, refined_mask)`` in input order. ``workers = 0`` runs in this process;
    otherwise a ``ProcessPoolExecutor`` of ``workers`` processes (platform start method) runs
    the CRF with at most ``2 * workers`` images in flight, so ``items`` may be a lazy stream.
    ``crf`` must be picklable; keys stay in this process.
    """
    if workers < 0:
        raise ValueError(f"refine_with_crf: workers must be >= 0, got {workers}")
    if workers == 0:
        for key, image, mask in items:
            yield key, crf(image, mask)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        for key, image, mask in items:
            pending.append((key, pool.submit(crf, image, mask)))
            if len(pending) >= 2 * workers:
                key, future = pending.popleft()
                yield key, future.result()
        while pending:
            key, future = pending.popleft()
            yield key, future.result()
