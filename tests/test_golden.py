"""The default min-max numerics against stored golden values (see tests/golden.py)."""

import math
from types import SimpleNamespace

import pytest
import torch.nn.functional as F

import golden
from deepmil import engine
from deepmil.model import MinMaxEntropyNet


def test_default_numerics_equal_the_golden_values():
    assert golden.mismatches(golden.compute_golden_values(), golden.load_golden_values()) == []


def flip_align_corners(monkeypatch):
    interpolate = F.interpolate

    def flipped(*args, align_corners=None, **kwargs):
        return interpolate(*args, align_corners=not align_corners, **kwargs)

    monkeypatch.setattr(F, "interpolate", flipped)


def shift_trust_decay(monkeypatch):
    late = SimpleNamespace(
        exp=lambda x: math.exp(x - 1 / golden.SIGMA_ERASE), isfinite=math.isfinite
    )
    monkeypatch.setattr(engine, "math", late)


def drop_region_reseeding(monkeypatch):
    classify_regions = MinMaxEntropyNet.classify_regions

    def unseeded(self, x, mask, fused=False, seed=None):
        return classify_regions(self, x, mask, fused)

    monkeypatch.setattr(MinMaxEntropyNet, "classify_regions", unseeded)


@pytest.mark.parametrize("change", [flip_align_corners, shift_trust_decay, drop_region_reseeding])
def test_golden_values_catch_a_change_of_the_numerics(monkeypatch, change):
    change(monkeypatch)
    assert golden.mismatches(golden.compute_golden_values(), golden.load_golden_values())
