"""The experiment folder: its name, logs, records of the run and result files."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
import yaml

from deepmil.config import SCHEMA
from deepmil.errors import ConfigError, RunError
from deepmil.files import atomic_write, write_json

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
REPOSITORY = Path(__file__).resolve().parents[1]
RUN_FILES = (
    "config.yaml",
    "classes.yaml",
    "environment.json",
    "training.log",
    "metrics.jsonl",
    "checkpoint.pt",
    "best_model.pt",
    "final_metrics.json",
    "results.md",
    "learning_curves.png",
    "test_predictions.png",
    "test_predictions.npz",
    "test_mask_histograms.png",
    "test_scoremaps.npz",
)
# The sub-folder of the results of ``--evaluate`` (removed with the run's files).
EVALUATION_FOLDER = "evaluation"
LOCK_FILE = ".lock"


def experiment_name(config: Mapping[str, Any]) -> str:
    """Readable folder name: config, method, model, fold, seed, erasing and a timestamp."""
    config_name = Path(config["yaml"]).stem
    stamp = time.strftime("%Y%m%d-%H%M%S")
    method = config["method"]
    default = method == SCHEMA["method"].default
    method = "" if default or method in config_name.split("-") else f"-{method}"
    return (
        f"{config_name}{method}-{config['model']['name']}-s{config['split']}f{config['fold']}"
        f"-erase{config['nbr_times_erase']}-seed{config['MYSEED']}-{stamp}"
    )


def experiment_folder(root: Path, name: str, overwrite: bool) -> Path:
    """``root/name``, checked before anything is written: ``name`` must be a plain folder name
    and an existing folder is an error unless ``overwrite`` is set."""
    if name in ("", ".", "..") or Path(name).name != name:
        raise ConfigError(f"experiment name {name!r} is not a plain folder name")
    folder = Path(root) / name
    if folder.exists() and not overwrite:
        raise FileExistsError(
            f"experiment folder {folder} already exists; use --overwrite to "
            f"replace its results or --resume {folder} to continue it"
        )
    return folder


def create_experiment_dir(folder: Path, overwrite: bool) -> None:
    """Create ``folder`` (with ``overwrite`` an existing one is kept)."""
    folder.mkdir(parents=True, exist_ok=overwrite)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the experiment ``folder`` while the block runs.

    The lock (``flock`` on ``folder/.lock``, which records the holder's process id) ends with
    the process, however it ends; a folder locked by another process is a ``RuntimeError``.
    """
    with open(folder / LOCK_FILE, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise RunError(
                f"experiment folder {folder} is in use by another run (process "
                f"{owner}); wait for it to end, or choose another "
                f"--exp-name"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def remove_run_files(folder: Path) -> None:
    """Delete the files a run writes (and temporary files of interrupted writes) in ``folder``."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / EVALUATION_FOLDER, ignore_errors=True)
    remove_temporary_files(folder)


def remove_temporary_files(folder: Path) -> None:
    """Delete the temporary files that a killed :func:`atomic_write` may leave in ``folder``."""
    for path in folder.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def discard_run(folder: Path) -> None:
    """Remove what a run wrote in ``folder`` (its lock too), and the folder itself if nothing
    else is in it."""
    remove_run_files(folder)
    (folder / LOCK_FILE).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


FILE_ONLY = {"file_only": True}


def setup_logging(quiet: bool = False) -> None:
    """Log to the console (warnings only when ``quiet``); called once per run. Records logged
    with ``extra=FILE_ONLY`` (what the console shows otherwise) go to ``training.log`` only."""
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=[console], force=True)


@contextlib.contextmanager
def file_logging(log_file: Path) -> Iterator[None]:
    """Also log everything to ``log_file`` while the block runs (the file is closed after it)."""
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def git(*args: str) -> str | None:
    """Output of ``git args`` in the repository, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", *args], cwd=REPOSITORY, text=True, capture_output=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def git_commit() -> str | None:
    """The repository's current commit, or None outside a git checkout."""
    return git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit, or None outside a git checkout."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def environment_record(config: Mapping[str, Any], argv: list[str]) -> dict[str, Any]:
    """Seed, command line, library versions, device, CPU threads (CPU results depend on their
    number) and git commit of this run."""
    return {
        "seed": config["MYSEED"],
        "command": [sys.executable, *argv],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pyyaml": yaml.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
    }


def add_resume_record(record: Mapping[str, Any], path: Path) -> None:
    """Append ``record`` to the ``resumed`` list of the run's ``environment.json``."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    data.setdefault("resumed", []).append(dict(record))
    write_json(data, path)


TABLE_COLUMNS = (
    ("cl_error", "cl. error (%)"),
    ("f1_pos", "F1+ (%)"),
    ("f1_neg", "F1- (%)"),
    ("iou", "IoU (%)"),
    ("pxap", "PxAP (%)"),
    ("f1_pos_all_ones", "F1+ all-ones (%)"),
    ("crf_f1_pos", "CRF F1+ (%)"),
    ("crf_f1_neg", "CRF F1- (%)"),
)


def results_table(final: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of the final metrics of each evaluated set (CRF columns when present),
    followed, for the sets that count them (``n_localized``), by the number of images the
    localisation metrics are computed on."""
    first = next(iter(final.values()))
    columns = [(key, title) for key, title in TABLE_COLUMNS if key in first]
    lines = [
        "| set | images | " + " | ".join(title for _, title in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for name, metrics in final.items():
        values = " | ".join(f"{metrics[key]:.2f}" for key, _ in columns)
        lines.append(f"| {name} | {metrics['n_images']} | {values} |")
    counted = [(name, metrics) for name, metrics in final.items() if "n_localized" in metrics]
    if counted:
        lines.append("")
    for name, metrics in counted:
        lines.append(
            f"{name}: localisation on {metrics['n_localized']} of {metrics['n_images']} images "
            f"(those with a mask)"
        )
    return "\n".join(lines) + "\n"


SAMPLE_ARRAYS = ("image", "gt_mask", "pred_mask", "crf_mask")


def save_prediction_samples(samples: list[dict], path: Path) -> None:
    """Store a few test predictions (see ``train_deepmil.prediction_samples``) as ``.npz``, for
    figures that compare methods on the same images."""
    arrays: dict[str, np.ndarray] = {
        "index": np.array([sample["index"] for sample in samples]),
        "caption": np.array([sample["caption"] for sample in samples]),
    }
    for number, sample in enumerate(samples):
        arrays.update(
            {
                f"{name}_{number}": np.asarray(sample[name])
                for name in SAMPLE_ARRAYS
                if name in sample
            }
        )
    atomic_write(path, lambda stream: np.savez_compressed(stream, **arrays))


def load_prediction_samples(path: Path) -> list[dict]:
    """The samples written by :func:`save_prediction_samples`."""
    with np.load(path) as data:
        samples = []
        for number, (index, caption) in enumerate(zip(data["index"], data["caption"])):
            sample = {"index": int(index), "caption": str(caption)}
            sample.update(
                {
                    name: data[f"{name}_{number}"]
                    for name in SAMPLE_ARRAYS
                    if f"{name}_{number}" in data
                }
            )
            samples.append(sample)
    return samples
