"""Shared test helpers: the repository root, the tiny runs of ``train_deepmil.py`` and what they
write, a tiny model and a tiny synthetic dataset."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from create_folds import ensure_synthetic_folds
from deepmil.config import default_values, merge_sections
from deepmil.model import MinMaxEntropyNet
from deepmil.synthetic import SyntheticSpec

REPO = Path(__file__).resolve().parents[1]
FOLD = Path("folds") / "synthetic" / "split_0" / "fold_0"
TRAIN_CSV = FOLD / "train_s_0_f_0.csv"
BATCH = 4


# ----------------------------------------------------------------------------- command line


def tiny_args(root: Path, *extra: str, exp_root: str = "exps") -> list[str]:
    """Three epochs (erasing from epoch 2) on the dataset of ``root``; ``extra`` can override."""
    return [
        "--yaml",
        "synthetic-4-erasing.yaml",
        "--cudaid",
        "cpu",
        "--epoch",
        "3",
        "--nbrerase",
        "2",
        "--epocherase",
        "2",
        "--bsize",
        str(BATCH),
        "--kmax",
        "1.0",
        "--kmin",
        "1.0",
        "--set",
        "synthetic.image_size=64",
        "--set",
        "crop_size=[64, 64]",
        "--set",
        "synthetic.n_train=16",
        "--set",
        "synthetic.n_test=6",
        "--set",
        "num_workers=0",
        "--set",
        f"fold_folder={root / 'folds'}",
        "--data-root",
        str(root / "data"),
        "--exp-root",
        str(root / exp_root),
        "--quiet",
        *extra,
    ]


def command(args: list[str]) -> list[str]:
    return [sys.executable, "train_deepmil.py", *args]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without MYSEED (the seed comes from the config), plus
    ``extra``."""
    env = {key: value for key, value in os.environ.items() if key != "MYSEED"}
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``train_deepmil.py args`` in a subprocess (MYSEED unset unless ``env`` sets it)."""
    return subprocess.run(
        command(args),
        cwd=REPO,
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command(args),
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_epochs(process: subprocess.Popen, metrics: Path, count: int) -> None:
    """Wait until ``metrics`` has ``count`` lines (the process must still be running)."""
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= count):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ----------------------------------------------------------------------------- experiment folders


def only_folder(root: Path) -> Path:
    folders = [path for path in root.iterdir() if path.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def epoch_metrics(folder: Path) -> list[dict]:
    """``metrics.jsonl`` without the timings."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds")
    return records


def final_metrics(folder: Path) -> dict:
    return json.loads((folder / "final_metrics.json").read_text())


def temporary_files(folder: Path) -> list[Path]:
    return list(folder.glob(".*.tmp"))


# ----------------------------------------------------------------------------- models and data


def tiny_net(k: float = 0.5) -> MinMaxEntropyNet:
    """ResNet-18 from scratch, 2 classes, 2 modalities, ``kmax = kmin = k``, seeded with 0."""
    torch.manual_seed(0)
    return MinMaxEntropyNet("resnet18", 2, modalities=2, kmax=k, kmin=k)


def tiny_synthetic_config(root: Path, n_train: int = 8, n_test: int = 5) -> dict:
    """Generate a 64-px synthetic dataset under ``root`` and return a configuration (schema
    defaults elsewhere) whose loader keys point at it."""
    ensure_synthetic_folds(
        root / "data", root / "folds", SyntheticSpec(image_size=64, n_train=n_train, n_test=n_test)
    )
    return merge_sections(
        default_values(),
        {
            "dataset": "synthetic",
            "data_root": str(root / "data"),
            "fold_folder": str(root / "folds"),
            "fold_name": None,
            "split": 0,
            "fold": 0,
            "name_classes": "encoding.yaml",
            "model": {"num_classes": 2},
            "crop_size": [64, 64],
            "padding_size": [0.5, 0.5],
            "padding_mode": "reflect",
            "up_scale_small_dim_to": None,
            "MYSEED": 0,
        },
    )
