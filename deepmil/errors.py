"""The project's own errors: a wrong input, never a bug.

Entry points turn a :class:`DeepMILError` (and an ``OSError``) into a one-line message and exit
code 1; anything else is a bug and keeps its traceback. Each subclass also derives from the
built-in error it stands for, so ``except ValueError`` still catches a bad value.
"""

from __future__ import annotations


class DeepMILError(Exception):
    """Base of the errors this project raises for bad input or a failed run."""


class ConfigError(DeepMILError, ValueError):
    """A configuration file, override, flag or environment value is invalid."""


class DataError(DeepMILError, ValueError):
    """A dataset, fold file, image or mask cannot be used."""


class CheckpointError(DeepMILError, ValueError):
    """A checkpoint or weights file cannot be read or does not fit the model."""


class WeightsError(DeepMILError, RuntimeError):
    """Pretrained weights cannot be fetched or do not match the trunk."""


class NonFiniteLossError(DeepMILError, RuntimeError):
    """Training diverged: a loss term, a weight or an evaluated score or mask is NaN or
    infinite."""


class RunError(DeepMILError, RuntimeError):
    """An experiment cannot go on: its folder is in use, or a run it launched failed."""
