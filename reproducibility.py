"""Seeding helpers: global seeds, deterministic kernels and per-sample random generators."""

from __future__ import annotations

import operator
import os
import random

import numpy as np
import torch

from deepmil.errors import ConfigError

SEED_LIMIT = 2**32
SAMPLE_SEED_BITS = 63


def _check_seed_part(name: str, value: int) -> int:
    """Return ``value`` as a plain int after checking it lies in ``[0, 2**32)``."""
    value = operator.index(value)
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{name} must be an integer in [0, 2**32), got {value}")
    return value


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    seed = _check_seed_part("seed", seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def set_deterministic(warn_only: bool = False) -> None:
    """Select deterministic cuDNN / cuBLAS kernels and make torch refuse non-deterministic ones.

    ``warn_only=True`` makes torch warn instead of raising when an operation has no
    deterministic implementation on the current device.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=warn_only)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` at ``epoch`` of a run seeded with ``seed``."""
    entropy = [
        _check_seed_part("seed", seed),
        _check_seed_part("epoch", epoch),
        _check_seed_part("index", index),
    ]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> (64 - SAMPLE_SEED_BITS)


def iteration_seed(seed: int, epoch: int, iteration: int) -> int:
    """Seed set around each training step (drives WILDCAT dropout): ``seed + epoch + iteration``.

    This is the original scheme, kept for fidelity: iteration ``i`` of epoch ``e`` and
    iteration ``i - 1`` of epoch ``e + 1`` share the same seed.
    """
    return operator.index(seed) + operator.index(epoch) + operator.index(iteration)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``sample_seed(seed, epoch, index)``."""
    generator = torch.Generator()
    generator.manual_seed(sample_seed(seed, epoch, index))
    return generator
