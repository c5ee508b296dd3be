"""The source task: a synthetic many-class classification dataset to pretrain a trunk on.

It stands in for ImageNet, which cannot be fetched offline. Its images are laid out like the
target synthetic dataset's (``deepmil.synthetic``: textured objects over a smooth background with
class-neutral distractors), but its classes come from texture families that the target never
uses, with parameters outside the target's: the target's classes are stripes at 0 and 90
degrees, a 45-degree cross-hatch, zigzags and rings with periods of 4.5-7 px; the source's are

* ``checks``: checkerboards (square cells) at one of several angles (never one whose cell
  edges, at the angle +-45 degrees, would run at 0 or 90 degrees);
* ``spots``: a regular lattice of round dots at one of several angles;
* ``spokes``: radial spokes around the object's centre, in one of several counts;
* ``spiral``: logarithmic spirals, in one of several arm counts;
* ``plaid``: two superposed stripe sets crossing at a non-right angle (never 0/45/90 degrees);
* ``wavy``: stripes at 22.5 degrees bent by a sine, in one of several amplitudes;

each with a period of 8-12 px. Class ``k`` is (family, parameter) number ``k``. Every image
depends only on (seed, index), so the set is rendered identically wherever it is built.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from deepmil.errors import ConfigError
from deepmil.synthetic import (
    cluttered_background,
    colour_pair,
    grid,
    layout,
    noisy_pixels,
    paint,
    sharpen,
    stripe_wave,
)

SOURCE_VERSION = 1
SOURCE_PERIOD_RANGE = (8.0, 12.0)
SOURCE_FAMILIES = {
    "checks": (np.pi / 12, np.pi / 8, np.pi / 6, np.pi / 3, 5 * np.pi / 12),
    "spots": (0.0, np.pi / 12, np.pi / 6, np.pi / 4, np.pi / 3),
    "spokes": (5, 7, 9, 11, 13),
    "spiral": (4, 6, 8, 10, 12),
    "plaid": (np.pi / 6, np.pi / 3, 2 * np.pi / 3, 5 * np.pi / 6, np.pi / 5),
    "wavy": (0.15, 0.3, 0.45, 0.6, 0.75),
}
SOURCE_CLASSES = tuple(
    (family, parameter) for family, values in SOURCE_FAMILIES.items() for parameter in values
)


@dataclass(frozen=True)
class SourceSpec:
    """The source dataset: ``num_classes`` classes (the first of :data:`SOURCE_CLASSES`),
    ``per_class`` images each of ``image_size`` px, drawn from ``seed`` (the configuration's
    ``pretrain`` section gives the values)."""

    num_classes: int
    per_class: int
    image_size: int
    seed: int

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(SOURCE_CLASSES):
            raise ConfigError(
                f"source num_classes = {self.num_classes} is out of range "
                f"(expected 2 to {len(SOURCE_CLASSES)})"
            )
        if self.per_class < 1 or self.image_size < 32:
            raise ConfigError(
                f"source per_class = {self.per_class} and image_size = {self.image_size} "
                f"are out of range (expected per_class >= 1 and image_size >= 32)"
            )

    @property
    def size(self) -> int:
        """The number of images."""
        return self.num_classes * self.per_class

    def record(self) -> dict:
        """The specification as stored beside a pretrained trunk (with the generator version)."""
        return {**asdict(self), "source_version": SOURCE_VERSION}

    def to_json(self) -> str:
        """:meth:`record` as canonical JSON."""
        return json.dumps(self.record(), sort_keys=True)


def source_texture(
    family: str,
    parameter: float,
    yy: np.ndarray,
    xx: np.ndarray,
    centre: tuple[float, float],
    period: float,
    phase: float,
) -> np.ndarray:
    """A source texture in [0, 1] over the whole grid."""
    dy, dx = yy - centre[0], xx - centre[1]
    if family == "checks":
        wave = stripe_wave(yy, xx, parameter, period, phase) * stripe_wave(
            yy, xx, parameter + np.pi / 2, period, phase
        )
    elif family == "spots":
        u = xx * np.cos(parameter) + yy * np.sin(parameter)
        v = -xx * np.sin(parameter) + yy * np.cos(parameter)
        cell_u = np.mod(u / period + phase / (2 * np.pi), 1.0) - 0.5
        cell_v = np.mod(v / period, 1.0) - 0.5
        wave = 1.0 - 2.0 * (np.hypot(cell_u, cell_v) > 0.3)
    elif family == "spokes":
        wave = np.sin(parameter * np.arctan2(dy, dx) + phase)
    elif family == "spiral":
        radius = np.log1p(np.hypot(dy, dx))
        wave = np.sin(parameter * np.arctan2(dy, dx) + 2 * np.pi * radius * 3.0 + phase)
    elif family == "plaid":
        wave = 0.5 * (
            stripe_wave(yy, xx, np.pi / 8, period, phase)
            + stripe_wave(yy, xx, np.pi / 8 + parameter, period, phase)
        )
    else:
        bend = parameter * period * np.sin(2 * np.pi * xx / (4 * period))
        wave = stripe_wave(yy + bend, xx, np.pi / 8, period, phase)
    return sharpen(wave)


def source_label(index: int, spec: SourceSpec) -> int:
    """The class of image ``index``: classes take turns, so every prefix is balanced."""
    return index % spec.num_classes


def render_source_image(spec: SourceSpec, index: int) -> tuple[np.ndarray, int]:
    """Image ``index`` of the source set (h x w x 3 uint8) and its class."""
    rng = np.random.default_rng([spec.seed, SOURCE_VERSION, index])
    label = source_label(index, spec)
    family, parameter = SOURCE_CLASSES[label]
    size = spec.image_size
    yy, xx = grid(size)
    image = cluttered_background(rng, size, SOURCE_PERIOD_RANGE)
    objects, centres = layout(rng, size, int(rng.integers(1, 4)))
    for region, centre in zip(objects, centres):
        period = rng.uniform(*SOURCE_PERIOD_RANGE)
        texture = source_texture(
            family, parameter, yy, xx, centre, period, rng.uniform(0.0, 2 * np.pi)
        )
        paint(image, region, texture, colour_pair(rng))
    return noisy_pixels(rng, image), label
