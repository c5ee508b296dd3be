"""Evaluation geometry: the short-side upscale and padding of the input, and the mask's way back
to the ground-truth geometry."""

import pytest
import torch

from deepmil.geometry import restore_mask_geometry, split_padding, upscaled_size


def test_upscale_truncation():
    # r = 500 / 103 = 4.854368932038835: 103 * r = 499.99999999999994 -> 499, 200 * r = 970.87 -> 970.
    assert upscaled_size(103, 200, 500) == (499, 970)
    # r = 500 / 121 = 4.132231404958677: 200 * r = 826.45 -> 826, 121 * r = 499.99999999999994 -> 499.
    assert upscaled_size(200, 121, 500) == (826, 499)
    assert upscaled_size(500, 300, 500) == (833, 500)
    assert upscaled_size(500, 700, 500) == (500, 700)
    assert upscaled_size(103, 200, None) == (103, 200)


def test_split_padding_multiple_of_32():
    assert split_padding(775) == (12, 13)
    assert split_padding(522) == (11, 11)
    assert split_padding(800) == (0, 0)
    assert split_padding(1) == (15, 16)


def column_index_mask(height: int, width: int) -> torch.Tensor:
    """1 x height x width mask whose value is the column index."""
    return torch.arange(width, dtype=torch.float32).expand(1, height, width).clone()


def row_index_mask(height: int, width: int) -> torch.Tensor:
    return torch.arange(height, dtype=torch.float32)[:, None].expand(1, height, width).clone()


def test_restore_odd_width_faithful_vs_exact():
    # width 5 padded to 8: leftover 3, padding 1 before / 2 after.
    mask = column_index_mask(4, 8)
    faithful = restore_mask_geometry(mask, (4, 8), (4, 5), (4, 5))
    exact = restore_mask_geometry(mask, (4, 8), (4, 5), (4, 5), exact=True)
    assert faithful.shape == (1, 4, 5)
    assert faithful[0, 0].tolist() == [2, 3, 4, 5, 6]
    assert exact[0, 0].tolist() == [1, 2, 3, 4, 5]


def test_restore_even_sizes_faithful_equals_exact():
    mask = torch.rand(1, 8, 8)
    faithful = restore_mask_geometry(mask, (8, 8), (6, 4), (6, 4))
    exact = restore_mask_geometry(mask, (8, 8), (6, 4), (6, 4), exact=True)
    assert torch.equal(faithful, exact)
    assert torch.equal(faithful, mask[:, 1:7, 2:6])


def test_restore_glas_width_775():
    # GlaS-like: 20 x 775 padded to 32 x 800 (rows 6/6, columns 12/13).
    cols = column_index_mask(32, 800)
    faithful = restore_mask_geometry(cols, (32, 800), (20, 775), (20, 775))
    exact = restore_mask_geometry(cols, (32, 800), (20, 775), (20, 775), exact=True)
    assert faithful.shape == exact.shape == (1, 20, 775)
    assert faithful[0, 0, 0] == 13 and faithful[0, 0, -1] == 787
    assert exact[0, 0, 0] == 12 and exact[0, 0, -1] == 786
    rows = row_index_mask(32, 800)
    restored_rows = restore_mask_geometry(rows, (32, 800), (20, 775), (20, 775))
    assert restored_rows[0, 0, 0] == 6 and restored_rows[0, -1, 0] == 25


def test_restore_upscaled_constant_and_half_half():
    # CUB/OxF-like: original 3 x 4, upscaled 6 x 8, padded 8 x 8 (one padded row each side).
    padded = torch.full((1, 8, 8), 9.0)
    padded[:, 1:7, :] = 0.7
    constant = restore_mask_geometry(padded, (8, 8), (6, 8), (3, 4))
    assert constant.shape == (1, 3, 4)
    assert torch.allclose(constant, torch.full((1, 3, 4), 0.7))

    half = torch.full((1, 8, 8), 9.0)
    half[:, 1:7, :4] = 0.0
    half[:, 1:7, 4:] = 1.0
    # align_corners=True: output columns sample input columns 0, 7/3, 14/3, 7.
    restored = restore_mask_geometry(half, (8, 8), (6, 8), (3, 4))
    assert torch.allclose(restored, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)[None])


def test_restore_keeps_2d_shape_and_checks_input():
    restored = restore_mask_geometry(torch.ones(8, 8), (8, 8), (5, 5), (5, 5))
    assert restored.shape == (5, 5)
    with pytest.raises(ValueError, match="padded size"):
        restore_mask_geometry(torch.ones(1, 8, 8), (8, 9), (5, 5), (5, 5))
    with pytest.raises(ValueError, match="larger size"):
        restore_mask_geometry(torch.ones(1, 8, 8), (8, 8), (9, 9), (9, 9))
