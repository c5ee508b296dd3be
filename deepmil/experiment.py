"""The experiment folder: its name, logs, records of the run and result files."""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import PIL
import torch
import torchvision
import yaml

from deepmil.checkpoint import atomic_write

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
REPOSITORY = Path(__file__).resolve().parents[1]


def experiment_name(config: Mapping[str, Any]) -> str:
    """Readable folder name: config, model, fold, seed, erasing and a timestamp."""
    config_name = Path(config["yaml"]).stem
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (f"{config_name}-{config['model']['name']}-s{config['split']}f{config['fold']}"
            f"-erase{config['nbr_times_erase']}-seed{config['MYSEED']}-{stamp}")


def create_experiment_dir(root: Path, name: str, overwrite: bool) -> Path:
    """Create ``root/name``; an existing folder is an error unless ``overwrite`` is set."""
    folder = Path(root) / name
    if folder.exists() and not overwrite:
        raise FileExistsError(f"experiment folder {folder} already exists; use --overwrite to "
                              f"replace its results or --resume {folder} to continue it")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def setup_logging(log_file: Path | None = None, quiet: bool = False) -> None:
    """Log to the console (warnings only when ``quiet``) and, if given, to ``log_file``."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    handlers[0].setLevel(logging.WARNING if quiet else logging.INFO)
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=handlers, force=True)


def git_commit() -> str | None:
    """The repository's current commit, or None outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPOSITORY, text=True,
                                capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment_record(config: Mapping[str, Any], argv: list[str]) -> dict[str, Any]:
    """Seed, command line, library versions, device and git commit of this run."""
    return {"seed": config["MYSEED"], "command": [sys.executable, *argv],
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "pyyaml": yaml.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "git_commit": git_commit()}


def write_json(data: Any, path: Path) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def append_json_line(data: Mapping[str, Any], path: Path) -> None:
    """Append one JSON record to a JSON-lines file."""
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(data) + "\n")


def results_table(final: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of the final metrics of each evaluated set."""
    lines = ["| set | images | cl. error (%) | F1+ (%) | F1- (%) | F1+ all-ones (%) | loss |",
             "|---|---|---|---|---|---|---|"]
    for name, metrics in final.items():
        lines.append(f"| {name} | {metrics['n_images']} | {metrics['cl_error']:.2f} | "
                     f"{metrics['f1_pos']:.2f} | {metrics['f1_neg']:.2f} | "
                     f"{metrics['f1_pos_all_ones']:.2f} | {metrics['loss']:.4f} |")
    return "\n".join(lines) + "\n"
