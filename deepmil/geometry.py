"""Evaluation geometry: an image's way to the network input and a predicted mask's way back.

Forward (:func:`compute_geometry`, used by the evaluation loader): an image of ``original``
size whose short side is below ``up_scale_small_dim_to`` is upscaled to ``upscaled``
(:func:`upscaled_size`, CUB/OxF), then padded to ``padded``, the next multiple of
``EVAL_MULTIPLE`` in each dimension, ``padding = (top, bottom, left, right)`` putting the floor
half of the leftover before and the ceil half after (:func:`split_padding`).

Inverse (:func:`restore_mask_geometry`, used by the evaluation loop): a mask of the ``padded``
size is centre-cropped to ``upscaled`` and resized back to ``original`` (bilinear), or, without
upscaling, centre-cropped to ``original``. With ``exact=True`` the crop starts where the
padding ended, undoing the padding to the pixel; the default reproduces the upstream crop,
one pixel later when the kept length is odd and the padded one even. The resize is an
interpolation, not an exact inverse of the upscaling.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

Size = tuple[int, int]
EVAL_MULTIPLE = 32


class Geometry(NamedTuple):
    """Evaluation geometry of one sample; sizes are (height, width)."""

    original: tuple[int, int]
    upscaled: tuple[int, int]
    padded: tuple[int, int]
    padding: tuple[int, int, int, int]


def upscaled_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """Size after the short-side rule: if ``min(h, w) < short_side`` scale by ``short_side / min``.

    The new size is truncated, ``(int(h * r), int(w * r))`` in double precision, so the short side
    can end at ``short_side - 1`` (e.g. 103 -> 499).
    """
    if short_side is None or min(height, width) >= short_side:
        return height, width
    ratio = short_side / min(height, width)
    return int(height * ratio), int(width * ratio)


def split_padding(size: int, multiple: int = EVAL_MULTIPLE) -> tuple[int, int]:
    """Padding (before, after) that brings ``size`` to the next multiple: floor / ceil halves."""
    leftover = (multiple - size % multiple) % multiple
    return leftover // 2, leftover - leftover // 2


def compute_geometry(height: int, width: int, short_side: int | None) -> Geometry:
    """Evaluation geometry of an image of (height, width)."""
    up_h, up_w = upscaled_size(height, width, short_side)
    top, bottom = split_padding(up_h)
    left, right = split_padding(up_w)
    return Geometry(
        original=(height, width),
        upscaled=(up_h, up_w),
        padded=(up_h + top + bottom, up_w + left + right),
        padding=(top, bottom, left, right),
    )


def _crop_start(src: int, dst: int, exact: bool) -> int:
    """First index of a centred window of length ``dst`` in a dimension of length ``src``.

    Faithful (upstream) start is ``src // 2 - dst // 2``; the exact inverse of a padding that put
    ``(src - dst) // 2`` elements before is ``(src - dst) // 2``. They differ by one when ``dst``
    is odd and ``src`` even.
    """
    if exact:
        return (src - dst) // 2
    return src // 2 - dst // 2


def center_crop(mask: torch.Tensor, size: Size, exact: bool = False) -> torch.Tensor:
    """Centre-crop the last two dimensions of ``mask`` to ``size = (h, w)``."""
    src_h, src_w = mask.shape[-2:]
    h, w = size
    if h > src_h or w > src_w:
        raise ValueError(f"cannot crop a mask of size {(src_h, src_w)} to the larger size {size}")
    top = _crop_start(src_h, h, exact)
    left = _crop_start(src_w, w, exact)
    return mask[..., top : top + h, left : left + w]


def resize_bilinear(mask: torch.Tensor, size: Size) -> torch.Tensor:
    """Resize the last two dimensions of a float mask (bilinear, ``align_corners=True``)."""
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:])
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=True)
    return out.reshape(*lead, *size)


def restore_mask_geometry(
    mask: torch.Tensor, padded_hw: Size, upscaled_hw: Size, original_hw: Size, exact: bool = False
) -> torch.Tensor:
    """Map a mask predicted on the padded evaluation input back to the ground-truth geometry.

    ``mask`` has shape ``(..., h_p, w_p)`` (e.g. ``1 x h_p x w_p``). When the image was upscaled
    (CUB/OxF) the mask is centre-cropped to ``upscaled_hw`` and resized to ``original_hw``
    (bilinear, ``align_corners=True``); any remaining mismatch (GlaS) is removed by a centre crop
    to ``original_hw``. ``exact=False`` reproduces the upstream crop (one pixel late for odd
    sizes); ``exact=True`` is the exact inverse of the evaluation padding. Leading dimensions are
    kept.
    """
    padded_hw, upscaled_hw, original_hw = tuple(padded_hw), tuple(upscaled_hw), tuple(original_hw)
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != padded_hw:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not end with padded size {padded_hw}"
        )
    out = mask if mask.is_floating_point() else mask.float()
    if upscaled_hw != original_hw:
        out = resize_bilinear(center_crop(out, upscaled_hw, exact), original_hw)
    if tuple(out.shape[-2:]) != original_hw:
        out = center_crop(out, original_hw, exact)
    return out
