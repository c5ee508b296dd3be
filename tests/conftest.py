"""Fixtures shared by the test modules: the tiny synthetic dataset of the command-line tests,
one reference training run on it, and the in-process command line. Plain helpers live in
tests/helpers.py."""

import logging
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import train_deepmil
from create_folds import ensure_synthetic_folds
from deepmil.synthetic import SyntheticSpec
from helpers import run_cli, tiny_args
from tools import get_yaml_args


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A folder holding ``data/`` and ``folds/`` of the tiny synthetic dataset."""
    root = tmp_path_factory.mktemp("dataset")
    config, _ = get_yaml_args(tiny_args(root))
    ensure_synthetic_folds(
        root / "data", root / "folds", SyntheticSpec.from_config(config["synthetic"]), "synthetic"
    )
    return root


@pytest.fixture
def own_data(dataset, tmp_path) -> Path:
    """A private copy of the dataset, to corrupt."""
    for name in ("data", "folds"):
        shutil.copytree(dataset / name, tmp_path / name)
    return tmp_path


@pytest.fixture(scope="session")
def reference_run(dataset) -> subprocess.CompletedProcess:
    """An uninterrupted run in a subprocess: 3 epochs, no workers, training and validation sets
    preloaded; its folder is ``reference``."""
    result = run_cli(tiny_args(dataset, "--exp-name", "reference"))
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="session")
def reference(dataset, reference_run) -> Path:
    """The experiment folder of ``reference_run``."""
    return dataset / "exps" / "reference"


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``train_deepmil.main`` in this process; returns ``(exit code, stderr)`` and keeps the
    last call's stdout in ``call.stdout``.

    Signal handlers, logging handlers and torch's determinism flags are restored afterwards.
    """
    monkeypatch.delenv("MYSEED", raising=False)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    log_handlers, log_level = root.handlers[:], root.level
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )

    def call(args: list[str]) -> tuple[int, str]:
        code = train_deepmil.main(args)
        captured = capsys.readouterr()
        call.stdout = captured.out
        return code, captured.err

    yield call
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    for handler in root.handlers:
        if handler not in log_handlers:
            handler.close()
    root.handlers[:], root.level = log_handlers, log_level
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
