"""Every metric of an evaluated set again, from its saved score maps, without the network.

Command line::

    python -m deepmil.evaluate --exp EXP_DIR [--split test] [--scoremaps FILE] [--out FILE]

reads ``EXP_DIR/<split>_scoremaps.npz`` (see :mod:`deepmil.scoremaps`) and the ground truth of
the run's fold CSV, and computes the metrics of the run's evaluation (they equal those of
``final_metrics.json``) and the box metrics of :mod:`deepmil.boxes`, against the boxes of the
ground-truth masks and, for CUB, also against ``bounding_boxes.txt`` (``cub_box_*`` keys). A new
metric therefore never needs the network again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

import loader
from deepmil import experiment, files
from deepmil.boxes import BoxAccuracyMeter, mask_boxes
from deepmil.config import load_config
from deepmil.engine import score
from deepmil.errors import DataError, DeepMILError
from deepmil.metrics import MetricSettings
from deepmil.scoremaps import read_scoremaps, scoremap_path

SPLITS = ("valid", "test", "train")
CUB_BOXES = Path("CUB_200_2011") / "bounding_boxes.txt"
CUB_IMAGES = Path("CUB_200_2011") / "images.txt"


def cub_boxes(root: Path) -> dict[str, np.ndarray] | None:
    """CUB's boxes by fold-CSV image path (``CUB_200_2011/images/<path>``), as inclusive pixel
    boxes ``(x0, y0, x1, y1)`` from its ``<id> <x> <y> <width> <height>`` lines; None when the
    dataset folder has no ``bounding_boxes.txt``."""
    if not (root / CUB_BOXES).is_file():
        return None
    images = dict(line.split(maxsplit=1) for line in read_lines(root / CUB_IMAGES))
    boxes = {}
    for number, line in enumerate(read_lines(root / CUB_BOXES), start=1):
        parts = line.split()
        if len(parts) != 5 or parts[0] not in images:
            raise DataError(
                f"{root / CUB_BOXES}:{number}: expected '<image id> x y w h', got {line!r}"
            )
        x, y, width, height = (float(value) for value in parts[1:])
        box = [int(x), int(y), int(x + width) - 1, int(y + height) - 1]
        boxes[f"CUB_200_2011/images/{images[parts[0]].strip()}"] = np.array([box])
    return boxes


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a text file, with a clear error if it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def with_truth(items: Iterable[dict], dataset: loader.PhotoDataset, source: str) -> Iterator[dict]:
    """The stored predictions with the ground truth of their row of ``dataset``; an archive of
    other images, or one that misses some, is an error naming ``source``."""
    seen = 0
    for item in items:
        index = item["index"]
        if not 0 <= index < len(dataset) or dataset.rows[index].image != item["image"]:
            raise DataError(
                f"{source}: image {item['image']!r} (row {index}) is not that row of "
                f"{dataset.csv_path}; the score maps belong to another split or fold"
            )
        item["truth"] = dataset.truth(index)
        seen += 1
        yield item
    if seen != len(dataset):
        raise DataError(f"{source} holds {seen} of the {len(dataset)} images of {dataset.csv_path}")


def with_boxes(
    items: Iterable[dict],
    meters: dict[str, BoxAccuracyMeter],
    given: dict[str, np.ndarray] | None,
) -> Iterator[dict]:
    """Pass ``items`` on, adding each image with a ground truth to the box meters: ``mask``
    (boxes of the ground-truth mask) and, with ``given`` boxes, ``cub``."""
    for item in items:
        if item["truth"] is not None:
            values = item["mask"][0].cpu().numpy()
            correct = item["predicted"] == item["label"]
            truth = mask_boxes(item["truth"][0].cpu().numpy() >= 0.5)
            meters["mask"].update(values, truth, correct)
            if given is not None:
                meters["cub"].update(values, given[item["image"]], correct)
        yield item


def stored_items(paths: Sequence[Path]) -> Iterator[dict]:
    """The predictions of every archive of ``paths`` (one per process of the evaluation)."""
    for path in paths:
        yield from read_scoremaps(path)


def default_archives(folder: Path, split: str) -> list[Path]:
    """``<split>_scoremaps.npz`` of ``folder``, or the archives of its processes
    (``<split>_scoremaps.rank<k>.npz``) when it was evaluated by several."""
    path = scoremap_path(folder, split)
    shards = sorted(folder.glob(f"{split}_scoremaps.rank*.npz"))
    return shards if shards and not path.is_file() else [path]


def rescore(config: dict, split: str, paths: Sequence[Path]) -> dict[str, float]:
    """The metrics of ``split`` computed from the score-map archives ``paths`` and the ground
    truth of the configuration's fold."""
    data = loader.DataConfig.from_config(config)
    dataset = loader.build_dataset(data, split, train=False, preload=False)
    metrics = MetricSettings.from_config(config["metrics"])
    given = cub_boxes(loader.dataset_root(data)) if data.dataset.startswith("Caltech") else None
    meters = {name: BoxAccuracyMeter(metrics.pxap_interval) for name in ("mask", "cub")}
    source = ", ".join(str(path) for path in paths)
    stream = with_boxes(with_truth(stored_items(paths), dataset, source), meters, given)
    summary = score(stream, metrics, optional_masks=dataset.spec.optional_masks).summary
    summary.update(meters["mask"].compute())
    if given is not None:
        summary.update({f"cub_{key}": value for key, value in meters["cub"].compute().items()})
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deepmil.evaluate",
        description="The metrics of an evaluated set (and its box metrics) from its saved "
        "score maps, without the network.",
    )
    parser.add_argument("--exp", required=True, help="experiment folder")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument(
        "--scoremaps",
        nargs="+",
        help="score-map archives (default: EXP/<split>_scoremaps.npz, or one per process)",
    )
    parser.add_argument("--data-root", help="parent folder of the datasets (default: the run's)")
    parser.add_argument(
        "--out", help="JSON file of the metrics (default: EXP/<split>_rescored.json)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; 1 with a message on bad input."""
    args = parse_args(argv)
    folder = Path(args.exp)
    try:
        config = load_config(folder / "config.yaml")
        if args.data_root:
            config["data_root"] = args.data_root
        paths = [Path(path) for path in args.scoremaps or ()]
        summary = rescore(config, args.split, paths or default_archives(folder, args.split))
    except (DeepMILError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else folder / f"{args.split}_rescored.json"
    files.write_json(summary, out)
    print(experiment.results_table({args.split: summary}), end="")
    boxes = ", ".join(f"{key} {value:.2f}" for key, value in summary.items() if "box" in key)
    print(f"box metrics: {boxes}\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
