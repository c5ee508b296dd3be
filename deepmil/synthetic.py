"""Synthetic weakly supervised localisation dataset.

Every image holds ``min_objects`` to ``max_objects`` (default 1-4) objects, random smooth blobs
filled with a texture that encodes the image's class; the class evidence exists only inside them.
The background is a smooth colour field with distractor blobs whose textures (isotropic "blotches"
and "dots") are drawn from the same distribution whatever the class, so the background alone
predicts the class at chance level.
Colours, shapes, sizes and positions are drawn independently of the class; the ground-truth mask is
the union of the objects.

Class textures are invariant (as a family) under horizontal and vertical flips, because the
synthetic training pipeline flips images without changing their labels:

* class 0: stripes whose bands run horizontally (intensity varies along y);
* class 1: the orthogonal stripes (bands run vertically);
* class 2: a diagonal cross-hatch (+45 and -45 degree stripes superposed);
* class 3: horizontal zigzag (chevron) bands;
* class 4: concentric rings around the object's centre.

The stripe period (4.5-7 px) is drawn independently of the class and is visible at the network's
input scale. Each image depends only on (seed, set, index in set), so generation is reproducible.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from deepmil.errors import DataError

GENERATOR_VERSION = 1
CLASS_PATTERNS = ("hstripes", "vstripes", "crosshatch", "zigzag", "rings")
DISTRACTOR_PATTERNS = ("blotches", "dots")
SETS = ("train", "test")
MIN_FOREGROUND = 0.05
MAX_FOREGROUND = 0.60
MAX_OBJECTS = 6
MIN_IMAGE_SIZE = 32
PERIOD_RANGE = (4.5, 7.0)
OBJECT_AREA_RANGE = (0.02, 0.40)
TOTAL_AREA_RANGE = (0.06, 0.55)
DISTRACTOR_AREA_RANGE = (0.02, 0.15)
LAYOUT_ATTEMPTS = 200
PIXEL_NOISE = 0.025
BACKGROUND_KNOTS = 6
ZIGZAG_WAVELENGTH = 2.5
ZIGZAG_AMPLITUDE = 1.2
METADATA_HEADER = ("image", "mask", "class", "set")


@dataclass(frozen=True)
class SyntheticSpec:
    """Generation parameters; ``spec.json`` stores them with the generator version."""

    num_classes: int = 2
    image_size: int = 128
    n_train: int = 240
    n_test: int = 100
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 4

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(f"synthetic.{field.name} must be an integer, got {value!r}")
        if not 2 <= self.num_classes <= len(CLASS_PATTERNS):
            raise DataError(
                f"synthetic.num_classes must be in [2, {len(CLASS_PATTERNS)}], "
                f"got {self.num_classes}"
            )
        if self.image_size < MIN_IMAGE_SIZE:
            raise DataError(
                f"synthetic.image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}"
            )
        if self.n_train < 2 * self.num_classes:
            raise DataError(
                f"synthetic.n_train must be >= 2 * num_classes = {2 * self.num_classes} "
                f"(each class needs a training and a validation image), got {self.n_train}"
            )
        if self.n_test < self.num_classes:
            raise DataError(
                f"synthetic.n_test must be >= num_classes = {self.num_classes}, got {self.n_test}"
            )
        if self.seed < 0:
            raise DataError(f"synthetic.seed must be >= 0, got {self.seed}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise DataError(
                f"synthetic.min_objects/max_objects must satisfy 1 <= min <= max <= {MAX_OBJECTS}, "
                f"got {self.min_objects}/{self.max_objects}"
            )

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any] | None) -> SyntheticSpec:
        """Spec from the config's ``synthetic`` mapping (missing keys take their defaults)."""
        mapping = dict(mapping or {})
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise DataError(
                f"unknown key(s) in config 'synthetic': {unknown}; expected some of {sorted(known)}"
            )
        return cls(**mapping)

    def to_json(self) -> str:
        """Canonical JSON text of the spec, as written to ``spec.json``."""
        record = {"generator_version": GENERATOR_VERSION, **asdict(self)}
        return json.dumps(record, indent=2, sort_keys=True) + "\n"


@dataclass
class Sample:
    """One rendered image: RGB ``image`` (uint8 HxWx3), boolean ``mask`` and per-object masks."""

    image: np.ndarray
    mask: np.ndarray
    objects: list[np.ndarray]
    label: int


def class_name(label: int) -> str:
    """Class name of an integer label (``class_<c>``)."""
    return f"class_{label}"


def sample_name(set_name: str, index: int) -> str:
    """File stem of image ``index`` of ``set_name``."""
    return f"{set_name}_{index:05d}"


def sample_label(index: int, num_classes: int) -> int:
    """Class of image ``index`` of a set: classes cycle, so every set is balanced."""
    return index % num_classes


def sample_rng(spec: SyntheticSpec, set_name: str, index: int) -> np.random.Generator:
    """Generator that depends only on (seed, set, index)."""
    return np.random.default_rng([spec.seed, SETS.index(set_name), index])


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a square image."""
    coords = np.arange(size, dtype=np.float64)
    return np.meshgrid(coords, coords, indexing="ij")


def blob(
    rng: np.random.Generator, size: int, area: float
) -> tuple[np.ndarray, tuple[float, float]]:
    """Random smooth blob of about ``area`` pixels centred in the image; returns (mask, centre)."""
    aspect = rng.uniform(0.55, 1.0)
    angle = rng.uniform(0.0, np.pi)
    amplitudes = rng.uniform(0.0, 0.12, size=3)
    phases = rng.uniform(0.0, 2 * np.pi, size=3)
    radius = np.sqrt(area / np.pi)
    semi_major, semi_minor = radius / np.sqrt(aspect), radius * np.sqrt(aspect)
    reach = semi_major * (1.0 + amplitudes.sum()) + 1.0
    margin = min(reach, size / 2.0)
    cy, cx = rng.uniform(margin, size - margin, size=2)
    top, bottom = max(0, int(cy - reach)), min(size, int(np.ceil(cy + reach)) + 1)
    left, right = max(0, int(cx - reach)), min(size, int(np.ceil(cx + reach)) + 1)
    dy, dx = np.meshgrid(np.arange(top, bottom) - cy, np.arange(left, right) - cx, indexing="ij")
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / semi_major
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / semi_minor
    theta = np.arctan2(v, u)
    harmonics = zip((2, 3, 4), amplitudes, phases)
    boundary = 1.0 + sum(a * np.cos(k * theta + p) for k, a, p in harmonics)
    mask = np.zeros((size, size), dtype=bool)
    mask[top:bottom, left:right] = np.hypot(u, v) <= boundary
    return mask, (cy, cx)


def layout(
    rng: np.random.Generator, size: int, n_objects: int
) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
    """Object masks and centres whose union covers [MIN_FOREGROUND, MAX_FOREGROUND] of the image."""
    pixels = size * size
    for _ in range(LAYOUT_ATTEMPTS):
        total = rng.uniform(*TOTAL_AREA_RANGE)
        shares = rng.dirichlet(np.full(n_objects, 2.0))
        areas = np.clip(total * shares, *OBJECT_AREA_RANGE) * pixels
        blobs = [blob(rng, size, area) for area in areas]
        masks = [mask for mask, _ in blobs]
        fraction = np.logical_or.reduce(masks).mean()
        if MIN_FOREGROUND <= fraction <= MAX_FOREGROUND and all(mask.any() for mask in masks):
            return masks, [centre for _, centre in blobs]
    raise DataError(f"no object layout met the foreground range in {LAYOUT_ATTEMPTS} attempts")


def sharpen(wave: np.ndarray) -> np.ndarray:
    """Map a wave in [-1, 1] to a near-square profile in [0, 1]."""
    return 0.5 + 0.5 * np.tanh(2.5 * wave) / np.tanh(2.5)


def stripe_wave(
    yy: np.ndarray, xx: np.ndarray, angle: float, period: float, phase: float
) -> np.ndarray:
    """Sinusoid varying along direction ``angle`` (0 = along x)."""
    return np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)


def _class_texture(
    pattern: str,
    yy: np.ndarray,
    xx: np.ndarray,
    centre: tuple[float, float],
    period: float,
    phase: float,
) -> np.ndarray:
    """Class texture in [0, 1] over the whole grid."""
    if pattern == "hstripes":
        wave = stripe_wave(yy, xx, np.pi / 2, period, phase)
    elif pattern == "vstripes":
        wave = stripe_wave(yy, xx, 0.0, period, phase)
    elif pattern == "crosshatch":
        diagonal = stripe_wave(yy, xx, np.pi / 4, period, phase)
        wave = 0.5 * (diagonal + stripe_wave(yy, xx, 3 * np.pi / 4, period, phase))
    elif pattern == "zigzag":
        triangle = 2.0 * np.abs(np.mod(xx / (ZIGZAG_WAVELENGTH * period), 1.0) - 0.5)
        wave = np.sin(2 * np.pi * (yy / period + ZIGZAG_AMPLITUDE * triangle) + phase)
    else:
        wave = np.sin(2 * np.pi * np.hypot(yy - centre[0], xx - centre[1]) / period + phase)
    return sharpen(wave)


def distractor_texture(
    rng: np.random.Generator, pattern: str, size: int, period: float
) -> np.ndarray:
    """Isotropic, class-neutral texture in [0, 1]: band-pass noise blotches or saturated dots."""
    if pattern == "blotches":
        field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=period / 3.0)
        return sharpen(np.clip(field / (field.std() + 1e-12), -1.0, 1.0))
    impulses = (rng.random((size, size)) < 1.0 / (1.5 * period**2)).astype(np.float64)
    peak = 1.0 / (2 * np.pi)
    return np.clip(ndimage.gaussian_filter(impulses, sigma=1.0) * 1.5 / peak, 0.0, 1.0)


def colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours in [0, 1] with a clear luminance contrast."""
    first = rng.uniform(0.1, 0.9, size=3)
    sign = 1.0 if first.mean() < 0.5 else -1.0
    second = first + sign * rng.uniform(0.3, 0.5) + rng.uniform(-0.15, 0.15, size=3)
    return first, np.clip(second, 0.0, 1.0)


def paint(
    image: np.ndarray,
    region: np.ndarray,
    texture: np.ndarray,
    colours: tuple[np.ndarray, np.ndarray],
) -> None:
    """Fill ``region`` of ``image`` with ``texture`` mixing the two colours."""
    weight = texture[region][:, None]
    image[region] = (1.0 - weight) * colours[0] + weight * colours[1]


def _smoothing_matrix(size: int, knots: int) -> np.ndarray:
    """Normalised Gaussian weights spreading ``knots`` coarse values over ``size`` pixels."""
    positions = (np.arange(size) + 0.5) * knots / size - 0.5
    weights = np.exp(-0.5 * ((positions[:, None] - np.arange(knots)[None, :]) / 0.7) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field (HxWx3 in [0, 1])."""
    spread = _smoothing_matrix(size, BACKGROUND_KNOTS)
    coarse = rng.standard_normal((3, BACKGROUND_KNOTS, BACKGROUND_KNOTS))
    field = np.moveaxis(spread @ coarse @ spread.T, 0, -1)
    field /= field.std(axis=(0, 1), keepdims=True) + 1e-12
    return np.clip(rng.uniform(0.25, 0.75, size=3) + 0.12 * field, 0.0, 1.0)


def cluttered_background(
    rng: np.random.Generator, size: int, period_range: tuple[float, float]
) -> np.ndarray:
    """A smooth colour field with 1 to 3 class-neutral distractor blobs (HxWx3 in [0, 1])."""
    image = background(rng, size)
    for _ in range(int(rng.integers(1, 4))):
        region, _ = blob(rng, size, rng.uniform(*DISTRACTOR_AREA_RANGE) * size * size)
        pattern = DISTRACTOR_PATTERNS[int(rng.integers(len(DISTRACTOR_PATTERNS)))]
        texture = distractor_texture(rng, pattern, size, rng.uniform(*period_range))
        paint(image, region, texture, colour_pair(rng))
    return image


def noisy_pixels(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """``image`` (in [0, 1]) with Gaussian pixel noise, as uint8."""
    image = image + rng.normal(0.0, PIXEL_NOISE, size=image.shape)
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_sample(spec: SyntheticSpec, set_name: str, index: int) -> Sample:
    """Render image ``index`` of ``set_name`` ("train" or "test")."""
    rng = sample_rng(spec, set_name, index)
    label = sample_label(index, spec.num_classes)
    size = spec.image_size
    yy, xx = grid(size)
    image = cluttered_background(rng, size, PERIOD_RANGE)
    n_objects = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    objects, centres = layout(rng, size, n_objects)
    for region, centre in zip(objects, centres):
        period, phase = rng.uniform(*PERIOD_RANGE), rng.uniform(0.0, 2 * np.pi)
        texture = _class_texture(CLASS_PATTERNS[label], yy, xx, centre, period, phase)
        paint(image, region, texture, colour_pair(rng))
    return Sample(
        image=noisy_pixels(rng, image),
        mask=np.logical_or.reduce(objects),
        objects=objects,
        label=label,
    )


def _write_dataset(folder: Path, spec: SyntheticSpec) -> None:
    """Write every image, mask, ``metadata.csv`` and ``spec.json`` into ``folder``."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = []
    for set_name, count in zip(SETS, (spec.n_train, spec.n_test)):
        for index in range(count):
            sample = render_sample(spec, set_name, index)
            stem = sample_name(set_name, index)
            image_path, mask_path = f"images/{stem}.png", f"masks/{stem}.png"
            Image.fromarray(sample.image, mode="RGB").save(folder / image_path)
            Image.fromarray(sample.mask.astype(np.uint8) * 255, mode="L").save(folder / mask_path)
            rows.append((image_path, mask_path, class_name(sample.label), set_name))
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(METADATA_HEADER)
        writer.writerows(rows)
    (folder / "spec.json").write_text(spec.to_json(), encoding="utf-8")


def read_metadata(root: Path) -> list[dict[str, str]]:
    """Rows of ``<root>/metadata.csv`` as dicts keyed by the header."""
    path = Path(root) / "metadata.csv"
    if not path.is_file():
        raise FileNotFoundError(f"synthetic metadata file not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != METADATA_HEADER:
            expected = ",".join(METADATA_HEADER)
            raise DataError(f"{path}: header must be {expected}, got {reader.fieldnames}")
        return list(reader)


def is_complete(root: Path, spec: SyntheticSpec) -> bool:
    """Whether ``root`` holds a finished dataset generated with exactly ``spec``."""
    root = Path(root)
    spec_path = root / "spec.json"
    if not spec_path.is_file() or spec_path.read_text(encoding="utf-8") != spec.to_json():
        return False
    if not (root / "metadata.csv").is_file():
        return False
    rows = read_metadata(root)
    if len(rows) != spec.n_train + spec.n_test:
        return False
    return all((root / row["image"]).is_file() and (root / row["mask"]).is_file() for row in rows)


def _replace_folder(root: Path, fresh: Path) -> None:
    """Swap ``fresh`` in place of ``root`` (the old content is removed only after the swap)."""
    if not root.exists():
        fresh.rename(root)
        return
    old = root.with_name(f".{root.name}.old-{os.getpid()}")
    root.rename(old)
    fresh.rename(root)
    shutil.rmtree(old)


def ensure_synthetic_dataset(root: Path, spec: SyntheticSpec) -> bool:
    """Generate the dataset into ``root`` unless it matches ``spec``; return whether it generated.

    Generation happens in a temporary sibling folder renamed at the end, so an interrupted run never
    leaves a folder that looks complete.
    """
    root = Path(root)
    if is_complete(root, spec):
        return False
    if root.is_dir() and not (root / "spec.json").is_file() and any(root.iterdir()):
        raise DataError(
            f"{root} exists and is not a synthetic dataset (no spec.json); move it away first"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(root)
    staging = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    total = spec.n_train + spec.n_test
    print(f"generating {total} synthetic images of {spec.image_size}px in {root}", flush=True)
    try:
        _write_dataset(staging, spec)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise OSError(
                error.errno,
                f"cannot write the synthetic dataset into {root}: {error.strerror or error}",
            ) from error
        raise
    _replace_folder(root, staging)
    return True


def process_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(root: Path) -> None:
    """Delete the staging folders of ``root`` left by generating processes that are gone."""
    for staging in root.parent.glob(f".{root.name}.tmp-*"):
        pid = staging.name.rpartition("-")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
