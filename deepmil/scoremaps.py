"""Score maps of an evaluated set, saved so that every metric can be computed again without the
network.

``<set>_scoremaps.npz`` (one compressed NumPy archive, written while the set is evaluated and
put in place when it is complete) holds, for each image of fold-CSV row ``i``, ``map_<i>``: its
continuous map in [0, 1] at the ground-truth size (float32, h x w), and per image, in row order
of ``index``: ``image`` (its path in the fold CSV), ``label``, ``predicted`` and ``probability``
(the predicted class and its softmax probability), ``loss_<name>`` (each per-image loss) and
``head_<name>`` (the class predicted by each other head, e.g. ``head_localizer``). Read it with
``numpy.load``, or with :func:`read_scoremaps` as the evaluation loop's per-image predictions.
"""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch

from deepmil import files
from deepmil.errors import DataError

SUFFIX = "_scoremaps.npz"
ROW_KEYS = ("index", "label", "predicted", "probability", "losses", "head_predicted")


def scoremap_path(folder: Path, split: str) -> Path:
    """Where the score maps of ``split`` go in an experiment folder."""
    return Path(folder) / f"{split}{SUFFIX}"


def write_array(archive: zipfile.ZipFile, name: str, values: np.ndarray) -> None:
    """Add ``values`` to ``archive`` as ``name.npy``."""
    with archive.open(f"{name}.npy", "w", force_zip64=True) as stream:
        np.lib.format.write_array(stream, np.asarray(values), allow_pickle=False)


def table(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """The per-image arrays of the archive, from the rows :func:`scoremap_writer` collected."""
    columns: dict[str, np.ndarray] = {
        "index": np.array([row["index"] for row in rows], dtype=np.int64),
        "image": np.array([row["image"] for row in rows], dtype=str),
        "label": np.array([row["label"] for row in rows], dtype=np.int64),
        "predicted": np.array([row["predicted"] for row in rows], dtype=np.int64),
        "probability": np.array([row["probability"] for row in rows], dtype=np.float64),
    }
    for name in rows[0]["losses"] if rows else ():
        columns[f"loss_{name}"] = np.array([row["losses"][name] for row in rows], np.float64)
    for name in rows[0]["head_predicted"] if rows else ():
        values = [row["head_predicted"][name] for row in rows]
        columns[f"head_{name}"] = np.array(values, dtype=np.int64)
    return columns


@contextlib.contextmanager
def scoremap_writer(path: Path, images: Sequence[str]) -> Iterator[Callable[[dict], None]]:
    """A function that adds one per-image prediction of the evaluation loop (``index``,
    ``mask``, classes, losses) to the archive ``path``; ``images`` are the fold CSV's image
    paths by row. The archive replaces ``path`` when the block ends without error."""
    rows: list[dict] = []
    stream: IO[bytes]
    with files.atomic_file(path) as stream:
        with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_DEFLATED) as archive:

            def add(item: dict) -> None:
                index = item["index"]
                write_array(archive, f"map_{index}", item["mask"][0].cpu().numpy())
                rows.append({key: item[key] for key in ROW_KEYS} | {"image": images[index]})

            yield add
            for name, values in table(rows).items():
                write_array(archive, name, values)


def read_scoremaps(path: Path, device: torch.device | str = "cpu") -> Iterator[dict]:
    """The per-image predictions stored in the archive ``path`` (as the evaluation loop yields
    them, with ``image`` and without the ground truth), in row order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"score maps not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{path} is not a score-map archive ({error})") from error
    with archive:
        if "index" not in archive.files:
            raise DataError(f"{path} is not a score-map archive (no 'index' array)")
        columns = {name: archive[name] for name in archive.files if not name.startswith("map_")}
        losses = [name for name in columns if name.startswith("loss_")]
        heads = [name for name in columns if name.startswith("head_")]
        for row, index in enumerate(columns["index"].tolist()):
            yield {
                "index": index,
                "image": str(columns["image"][row]),
                "label": int(columns["label"][row]),
                "predicted": int(columns["predicted"][row]),
                "probability": float(columns["probability"][row]),
                "losses": {name[5:]: float(columns[name][row]) for name in losses},
                "head_predicted": {name[5:]: int(columns[name][row]) for name in heads},
                "mask": torch.from_numpy(archive[f"map_{index}"])[None].to(device),
            }
