"""Masks for your own images, from a trained experiment.

Command line::

    python -m deepmil.predict --exp EXP_DIR --images PATH [PATH ...] --out DIR

Each ``PATH`` is an image, a folder (searched recursively for the image formats Pillow reads)
or a glob pattern. For every image ``NAME`` (its path relative to the folder it was found in,
or its file name) it writes ``maps/NAME.png`` (the continuous map at the image's size as a
16-bit PNG, value / 65535; ``--map-format npy`` writes float32 ``maps/NAME.npy``),
``masks/NAME.png`` (the map thresholded at 0.5), ``overlays/NAME.png`` (the mask over the
image), and one ``predictions.csv`` with the predicted class, its probability and every class's
probability. Unreadable images are reported and skipped; the exit code is then 1.

In Python::

    from deepmil.predict import load

    predictor = load("exps/my-run")
    result = predictor.predict("image.jpg")
    result.class_name, result.confidence, result.mask  # mask: bool array, h x w

The evaluation geometry, precision and crop rule are those of the experiment's test set, so
the map of an image of the test set equals the one its evaluation scored.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn
from tqdm import tqdm

import loader
from deepmil import files
from deepmil.checkpoint import load_model_weights
from deepmil.config import load_config
from deepmil.distributed import select_device
from deepmil.errors import DataError, DeepMILError
from deepmil.geometry import Geometry, compute_geometry, restore_mask_geometry
from deepmil.methods import Method, build_network, get_method
from deepmil.precision import Precision

CLASSES_FILE = "classes.yaml"
MASK_THRESHOLD = 0.5
MAP_FORMATS = ("png", "npy")
OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)
OVERLAY_OPACITY = 0.45


@dataclass(frozen=True)
class Prediction:
    """One image's prediction: its class probabilities, the predicted class and the continuous
    map in [0, 1] at the image's size."""

    probabilities: np.ndarray
    predicted: int
    class_name: str
    map: np.ndarray

    @property
    def confidence(self) -> float:
        """Probability of the predicted class."""
        return float(self.probabilities[self.predicted])

    @property
    def mask(self) -> np.ndarray:
        """The map thresholded at 0.5 (the threshold of the evaluation's F1 and IoU)."""
        return self.map >= MASK_THRESHOLD


class Predictor:
    """A trained network with its experiment's method, class names and evaluation geometry."""

    def __init__(self, network: nn.Module, config: dict, classes: Sequence[str], device) -> None:
        self.network = network.eval()
        self.method: Method = get_method(config["method"])
        self.classes = list(classes)
        self.device = torch.device(device)
        self.precision = Precision.build(config["amp"], self.device, config["channels_last"])
        self.short_side: int | None = config["up_scale_small_dim_to"]
        self.exact_crop: bool = config["exact_eval_crop"]
        self.batch_size: int = config["eval_batch_size"]

    def geometry(self, image: Image.Image) -> Geometry:
        """The evaluation geometry of ``image``."""
        return compute_geometry(image.height, image.width, self.short_side)

    @torch.no_grad()
    def predict_batch(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Predictions of RGB images of one size, in one forward pass."""
        geometries = {self.geometry(image) for image in images}
        if len(geometries) != 1:
            raise ValueError("predict_batch needs images of one size")
        (geometry,) = geometries
        inputs = torch.stack([loader.eval_input(image, geometry) for image in images])
        inputs = self.precision.to_device(inputs, self.device)
        with self.precision.autocast(enabled=self.method.eval_autocast):
            scores, maps = self.method.predict(self.network, inputs, len(images) > 1)
        probabilities = torch.softmax(scores, dim=1).cpu().numpy()
        predictions = []
        for row, probability in enumerate(probabilities):
            restored = restore_mask_geometry(
                maps[row].float(),
                geometry.padded,
                geometry.upscaled,
                geometry.original,
                exact=self.exact_crop,
            )
            predicted = int(probability.argmax())
            predictions.append(
                Prediction(
                    probability, predicted, self.classes[predicted], restored[0].cpu().numpy()
                )
            )
        return predictions

    def predict(self, image: Image.Image | str | Path) -> Prediction:
        """Prediction of one image (a PIL image or a file)."""
        if not isinstance(image, Image.Image):
            image = loader.load_rgb(Path(image))
        return self.predict_batch([image.convert("RGB")])[0]


def class_names(folder: Path | None, config: dict) -> list[str]:
    """Class names by id: the experiment's ``classes.yaml``, else the configuration's encoding
    (inline, or the file in its fold folder)."""
    if folder is not None and (folder / CLASSES_FILE).is_file():
        encoding = yaml.safe_load((folder / CLASSES_FILE).read_text(encoding="utf-8"))
    else:
        data = loader.DataConfig.from_config(config)
        encoding = loader.load_encoding(data.name_classes, loader.fold_dir(data))
    return sorted(encoding, key=encoding.get)


def write_class_names(folder: Path, encoding: dict[str, int]) -> None:
    """Record a run's class encoding in its folder, so that predictions need no fold folder."""
    files.write_text(yaml.safe_dump(dict(encoding), sort_keys=False), folder / CLASSES_FILE)


def load(
    exp: str | Path | None = None,
    *,
    config: str | Path | None = None,
    weights: str | Path | None = None,
    device: str | torch.device | None = "cpu",
) -> Predictor:
    """The predictor of experiment folder ``exp`` (its ``config.yaml`` and ``best_model.pt``),
    or of a ``config`` file and a ``weights`` file; either overrides the folder's. ``device``:
    a torch device, or ``None`` for the first GPU if there is one."""
    folder = None if exp is None else Path(exp)
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"experiment folder not found: {folder}")
    config_path = Path(config) if config else folder / "config.yaml" if folder else None
    weights_path = Path(weights) if weights else folder / "best_model.pt" if folder else None
    if config_path is None or weights_path is None:
        raise ValueError("give an experiment folder, or both a config file and a weights file")
    if not config_path.is_file():
        raise FileNotFoundError(f"config file not found: {config_path}")
    settings = load_config(config_path)
    device = select_device(None) if device is None else torch.device(device)
    network = build_network(network_config(settings), device)
    load_model_weights(network, weights_path, strict=True)
    return Predictor(network, settings, class_names(folder, settings), device)


def network_config(config: dict) -> dict:
    """``config`` for a network whose weights all come from a file: no pretrained trunk, no
    user weights, no compilation."""
    model = {**config["model"], "pretrained": False}
    return {**config, "model": model, "path_pre_trained": None, "compile": None}


# ----------------------------------------------------------------------------- inputs


def image_suffixes() -> set[str]:
    """File suffixes of the image formats Pillow opens."""
    return {suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN}


def find_images(paths: Sequence[str]) -> list[tuple[Path, str]]:
    """``(file, output name)`` of every image named by ``paths`` (files, folders, globs), in
    order, without repeats; an output name that two files would share is an error."""
    suffixes = image_suffixes()
    found: dict[Path, str] = {}
    for text in paths:
        path = Path(text)
        if path.is_dir():
            members = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
            )
            found.update((member, member.relative_to(path).as_posix()) for member in members)
        elif path.is_file():
            found[path] = path.name
        elif glob.has_magic(text):
            matches = sorted(Path(match) for match in glob.glob(text, recursive=True))
            found.update((match, match.name) for match in matches if match.is_file())
        else:
            raise FileNotFoundError(f"no such image, folder or pattern: {text}")
    if not found:
        raise DataError(f"no image found in {', '.join(paths)}")
    by_name: dict[str, Path] = {}
    for path, name in found.items():
        if name in by_name:
            raise DataError(
                f"{by_name[name]} and {path} would both be written as {name!r}; give their "
                f"common folder instead of the files"
            )
        by_name[name] = path
    return list(found.items())


def size_groups(
    images: Sequence[tuple[Path, str]], batch_size: int
) -> tuple[list[list[tuple[Path, str]]], list[tuple[str, str]]]:
    """Batches of at most ``batch_size`` images of one size (first-seen order) and the
    ``(file, reason)`` of the images whose size cannot be read."""
    groups: dict[tuple[int, int], list[tuple[Path, str]]] = {}
    failures = []
    for path, name in images:
        try:
            size = loader.read_size(path)
        except DataError as error:
            failures.append((str(path), str(error)))
            continue
        groups.setdefault(size, []).append((path, name))
    batches = [
        group[start : start + batch_size]
        for group in groups.values()
        for start in range(0, len(group), batch_size)
    ]
    return batches, failures


# ----------------------------------------------------------------------------- outputs


def map_png(values: np.ndarray) -> bytes:
    """A map in [0, 1] as a 16-bit grey PNG (value * 65535, rounded)."""
    levels = np.rint(np.clip(values, 0.0, 1.0) * 65535).astype(np.uint16)
    return png_bytes(Image.fromarray(levels))


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (or on the image border)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """``image`` with ``mask`` tinted in one colour and outlined."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    tinted = np.where(
        mask[..., None], (1 - OVERLAY_OPACITY) * pixels + OVERLAY_OPACITY * OVERLAY_COLOUR, pixels
    )
    tinted[mask_outline(mask)] = OVERLAY_COLOUR
    return Image.fromarray(np.rint(tinted).astype(np.uint8))


def write_outputs(
    out: Path, name: str, image: Image.Image, result: Prediction, map_format: str
) -> None:
    """The map, mask and overlay files of one image."""
    if map_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, result.map.astype(np.float32))
        write_bytes(out / "maps" / f"{name}.npy", buffer.getvalue())
    else:
        write_bytes(out / "maps" / f"{name}.png", map_png(result.map))
    mask = Image.fromarray(result.mask.astype(np.uint8) * 255)
    write_bytes(out / "masks" / f"{name}.png", png_bytes(mask))
    write_bytes(out / "overlays" / f"{name}.png", png_bytes(overlay(image, result.mask)))


def write_bytes(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` atomically (its folder is created)."""
    files.atomic_write(path, lambda stream: stream.write(content))


def csv_text(rows: Iterable[tuple[str, Prediction]], classes: Sequence[str]) -> str:
    """``predictions.csv``: image, predicted class, its probability, every class's."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "class", "confidence", *classes])
    for name, result in rows:
        writer.writerow(
            [
                name,
                result.class_name,
                f"{result.confidence:.6f}",
                *(f"{value:.6f}" for value in result.probabilities),
            ]
        )
    return buffer.getvalue()


# ----------------------------------------------------------------------------- command line


def predict_files(
    predictor: Predictor,
    images: Sequence[tuple[Path, str]],
    out: Path,
    batch_size: int,
    map_format: str = "png",
) -> tuple[list[tuple[str, Prediction]], list[tuple[str, str]]]:
    """Predict and write every image (same-size images in batches); returns the predictions by
    output name, in input order, and the ``(file, reason)`` of every image that failed."""
    batches, failures = size_groups(images, batch_size)
    order = {name: position for position, (_, name) in enumerate(images)}
    results = []
    with tqdm(total=len(images), desc="predict", unit="image", disable=None) as bar:
        bar.update(len(failures))
        for batch in batches:
            decoded = list(decode(batch, failures))
            if decoded:
                predictions = predictor.predict_batch([image for _, image in decoded])
                for (name, image), result in zip(decoded, predictions):
                    write_outputs(out, name, image, result, map_format)
                    results.append((name, result))
            bar.update(len(batch))
    results.sort(key=lambda item: order[item[0]])
    return results, failures


def decode(
    batch: Sequence[tuple[Path, str]], failures: list[tuple[str, str]]
) -> Iterator[tuple[str, Image.Image]]:
    """``(output name, RGB image)`` of the images of ``batch`` that decode; the others are
    added to ``failures``."""
    for path, name in batch:
        try:
            yield name, loader.load_rgb(path)
        except DataError as error:
            failures.append((str(path), str(error)))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deepmil.predict",
        description="Class, continuous map, mask and overlay of your own images, from a "
        "trained experiment.",
        epilog="example: python -m deepmil.predict --exp exps/my-run --images photos/ "
        "--out predictions/",
    )
    parser.add_argument("--exp", help="experiment folder (its config.yaml and best_model.pt)")
    parser.add_argument("--config", help="configuration file (instead of the folder's)")
    parser.add_argument("--weights", help="weights file (instead of the folder's best_model.pt)")
    parser.add_argument(
        "--images", nargs="+", required=True, help="image files, folders or glob patterns"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="images of one size per forward pass (default: the experiment's eval_batch_size)",
    )
    parser.add_argument("--map-format", choices=MAP_FORMATS, default="png")
    parser.add_argument(
        "--cudaid", default=None, help="'cpu' or a GPU index (default: the first GPU, if any)"
    )
    args = parser.parse_args(argv)
    if args.exp is None and (args.config is None or args.weights is None):
        parser.error("give --exp, or both --config and --weights")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 when every image was predicted, 1 otherwise."""
    args = parse_args(argv)
    try:
        predictor = load(
            args.exp, config=args.config, weights=args.weights, device=select_device(args.cudaid)
        )
        images = find_images(args.images)
        out = Path(args.out)
        batch_size = args.batch_size or predictor.batch_size
        results, failures = predict_files(predictor, images, out, batch_size, args.map_format)
        files.write_text(csv_text(results, predictor.classes), out / "predictions.csv")
    except (DeepMILError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{len(results)} of {len(images)} images predicted; results in {out}")
    for path, reason in failures:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
