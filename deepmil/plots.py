"""Figures: learning curves, mask overlay panels and mask-value histograms written as PNG files.

Figures are built with ``matplotlib.figure.Figure`` (rendered by Agg, never registered with
pyplot), so no global backend or figure state is touched and nothing stays open after saving.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from deepmil.files import atomic_write

OVERLAY_ALPHA = 128 / 255
REGION_COLORMAP = "Reds"
REGION_ALPHA = 0.55
TRUTH_OUTLINE = "yellow"
MOVING_AVERAGE = 20
PANEL_TITLES = ("image", "ground truth", "prediction (R+ >= 0.5)", "continuous R+")
NO_TRUTH_TITLE = "no ground truth"
CRF_TITLE = "CRF-refined R+"
CURVE_GROUPS = (
    ("losses", "loss", lambda key: "loss" in key),
    ("classification error", "error (%)", lambda key: "error" in key),
    ("localisation", "F1", lambda key: "f1" in key),
    ("learning rate", "lr", lambda key: key == "lr" or key.endswith("_lr")),
)
LR_GROUP = 3


def _group_of(key: str) -> int | None:
    for index, (_, _, matches) in enumerate(CURVE_GROUPS):
        if matches(key):
            return index
    return None


def _series(history: Sequence[Mapping[str, object]], key: str) -> np.ndarray:
    out = np.full(len(history), np.nan)
    for i, entry in enumerate(history):
        value = entry.get(key)
        if value is None:
            continue
        try:
            out[i] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"history entry {i}: '{key}' = {value!r} is not a number") from None
    return out


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` previous values (NaNs ignored)."""
    out = np.full_like(values, np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        if np.isfinite(chunk).any():
            out[i] = np.nanmean(chunk)
    return out


def plot_learning_curves(history: Sequence[Mapping[str, object]], path: str | Path) -> Path:
    """Plot per-epoch statistics into a PNG: one subplot per group (losses, errors, F1, lr).

    ``history`` holds one dict per epoch (``epoch``, ``train_loss``, ``valid_cl_error``,
    ``valid_f1_pos``, ``lr``...); only the keys present are drawn, missing/None values are gaps.
    With more than 20 epochs a trailing 20-epoch moving average is drawn dashed over each curve
    (except the learning rate, drawn on a log scale). Returns the written path.
    """
    if not history:
        raise ValueError(f"plot_learning_curves: empty history, nothing to plot into {path}")
    keys = sorted({key for entry in history for key in entry if key != "epoch"})
    groups: dict[int, list[str]] = {}
    for key in keys:
        index = _group_of(key)
        if index is not None:
            groups.setdefault(index, []).append(key)
    if not groups:
        raise ValueError(f"plot_learning_curves: no plottable key among {keys} for {path}")
    epochs = (
        _series(history, "epoch")
        if all("epoch" in entry for entry in history)
        else np.arange(len(history), dtype=float)
    )
    fig = Figure(figsize=(8, 3 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)
    for ax, index in zip(axes[:, 0], sorted(groups)):
        title, ylabel, _ = CURVE_GROUPS[index]
        smooth = len(history) > MOVING_AVERAGE and index != LR_GROUP
        for key in groups[index]:
            values = _series(history, key)
            (line,) = ax.plot(epochs, values, marker="." if len(values) < 50 else None, label=key)
            if smooth:
                ax.plot(
                    epochs,
                    _moving_average(values, MOVING_AVERAGE),
                    linestyle="--",
                    color=line.get_color(),
                    linewidth=1,
                )
        if index == LR_GROUP:
            ax.set_yscale("log")
        if smooth:
            title = f"{title} (dashed: {MOVING_AVERAGE}-epoch moving average)"
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("epoch")
    return _save(fig, path)


def plot_comparison_curves(
    histories: Mapping[str, Sequence[Sequence[Mapping[str, object]]]],
    panels: Sequence[tuple[str, str]],
    path: str | Path,
    references: Mapping[str, tuple[str, str]] | None = None,
) -> Path:
    """Per-epoch curves of several settings, one panel per ``(key, title)`` of ``panels``.

    ``histories`` maps a setting's label to its runs' histories (one dict per epoch, as in
    ``metrics.jsonl``); each line is the mean over the runs, shaded between their minimum and
    maximum. Settings without the panel's key are left out of it. ``references`` maps a panel's
    key to ``(key, label)`` of a value drawn dotted in black on it, averaged over every run (e.g.
    the ground truth's area on the mask-area panel). Returns the written path.
    """
    references = references or {}
    drawn = [
        (key, title)
        for key, title in panels
        if any(key in entry for runs in histories.values() for run in runs for entry in run)
    ]
    if not drawn:
        raise ValueError(f"plot_comparison_curves: no run has any of {[k for k, _ in panels]}")
    columns = 2 if len(drawn) > 1 else 1
    rows = (len(drawn) + columns - 1) // columns
    fig = Figure(figsize=(6 * columns, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (key, title) in zip(axes, drawn):
        for label, runs in histories.items():
            series = [_series(run, key) for run in runs if any(key in entry for entry in run)]
            if series:
                _mean_band(ax, series, label)
        if key in references:
            reference, name = references[key]
            series = [_series(run, reference) for runs in histories.values() for run in runs]
            series = [values for values in series if np.isfinite(values).any()]
            if series:
                mean = np.nanmean(_stacked(series), axis=0)
                ax.plot(np.arange(len(mean)), mean, "k:", label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes[len(drawn) :]:
        ax.set_visible(False)
    return _save(fig, path)


def _stacked(series: Sequence[np.ndarray]) -> np.ndarray:
    """Equal-length rows (shorter ones padded with NaN)."""
    length = max(len(values) for values in series)
    out = np.full((len(series), length), np.nan)
    for row, values in zip(out, series):
        row[: len(values)] = values
    return out


def _mean_band(ax: Axes, series: Sequence[np.ndarray], label: str) -> None:
    """The mean of ``series`` per epoch, shaded between their minimum and maximum."""
    stacked = _stacked(series)
    epochs = np.arange(stacked.shape[1])
    (line,) = ax.plot(epochs, np.nanmean(stacked, axis=0), marker=".", label=label)
    if len(series) > 1:
        low, high = np.nanmin(stacked, axis=0), np.nanmax(stacked, axis=0)
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15)


def denormalize_image(tensor: torch.Tensor) -> np.ndarray:
    """``3 x H x W`` image normalised with mean 0.5 / std 0.5 -> ``H x W x 3`` uint8 array."""
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"denormalize_image expects a 3xHxW tensor, got {tuple(tensor.shape)}")
    pixels = (tensor.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(1, 2, 0).numpy()


def _check_sample(index: int, sample: Mapping[str, object]) -> None:
    missing = [k for k in ("image", "pred_mask", "caption") if k not in sample]
    if missing:
        raise ValueError(f"save_mask_panels: sample {index} lacks keys {missing}")
    image = np.asarray(sample["image"])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"save_mask_panels: sample {index} image must be an HxWx3 uint8 array, "
            f"got shape {image.shape} dtype {image.dtype}"
        )
    for key in ("gt_mask", "pred_mask", "crf_mask"):
        if key in sample and np.asarray(sample[key]).shape != image.shape[:2]:
            raise ValueError(
                f"save_mask_panels: sample {index} {key} has shape "
                f"{np.asarray(sample[key]).shape}, image is {image.shape[:2]}"
            )


def _overlay(ax: Axes, image: np.ndarray, mask: np.ndarray) -> None:
    ax.imshow(image)
    ax.imshow(
        mask, cmap="seismic", vmin=0.0, vmax=1.0, alpha=OVERLAY_ALPHA, interpolation="nearest"
    )


def save_mask_panels(
    samples: Sequence[Mapping[str, object]], path: str | Path, title: str | None = None
) -> Path:
    """One row per sample: image, ground-truth overlay, thresholded prediction overlay and
    continuous prediction overlay ('seismic' colormap, alpha 128/255: blue = 0, red = 1), with
    the sample's caption above the row. A sample without ``gt_mask`` (an image without a
    ground truth) shows the plain image in its place. When the samples carry a ``crf_mask``
    (all of them or none), a fifth column overlays it. Returns the written PNG path."""
    if not samples:
        raise ValueError(f"save_mask_panels: no sample to draw into {path}")
    for index, sample in enumerate(samples):
        _check_sample(index, sample)
    with_crf = ["crf_mask" in sample for sample in samples]
    if any(with_crf) and not all(with_crf):
        raise ValueError(
            f"save_mask_panels: 'crf_mask' given for {sum(with_crf)} of "
            f"{len(samples)} samples; give it for all or none"
        )
    titles = PANEL_TITLES + ((CRF_TITLE,) if all(with_crf) else ())
    height, width = np.asarray(samples[0]["image"]).shape[:2]
    panel_w = 3.0
    panel_h = max(1.5, min(6.0, panel_w * height / width)) + 0.6
    fig = Figure(
        figsize=(len(titles) * panel_w, panel_h * len(samples) + (0.5 if title else 0)),
        layout="constrained",
    )
    rows = np.atleast_1d(fig.subfigures(len(samples), 1))
    for row, sample in zip(rows, samples):
        image = np.asarray(sample["image"])
        pred = np.asarray(sample["pred_mask"], dtype=float)
        gt = np.asarray(sample["gt_mask"], dtype=float) if "gt_mask" in sample else None
        panels = (None, gt, (pred >= 0.5).astype(float), pred)
        if "crf_mask" in sample:
            panels += (np.asarray(sample["crf_mask"], dtype=float),)
        row_titles = titles if gt is not None else (titles[0], NO_TRUTH_TITLE, *titles[2:])
        axes = row.subplots(1, len(titles))
        for ax, panel_title, mask in zip(axes, row_titles, panels):
            if mask is None:
                ax.imshow(image)
            else:
                _overlay(ax, image, mask)
            ax.set_title(panel_title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        row.suptitle(str(sample["caption"]), fontsize=10)
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    return _save(fig, path)


def _region_overlay(
    ax: Axes, image: np.ndarray, region: np.ndarray, truth: np.ndarray | None
) -> None:
    """``image`` with ``region`` (a binary mask) tinted red and the outline of ``truth`` (none
    without a ground truth)."""
    ax.imshow(image)
    ax.imshow(
        np.ma.masked_where(region < 0.5, region),
        cmap=REGION_COLORMAP,
        vmin=0.0,
        vmax=1.0,
        alpha=REGION_ALPHA,
        interpolation="nearest",
    )
    if truth is not None and truth.min() != truth.max():
        ax.contour(truth, levels=[0.5], colors=TRUTH_OUTLINE, linewidths=1.0)


def save_method_comparison(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray | None],
    methods: Sequence[tuple[str, Sequence[np.ndarray]]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """One row per test image: the image, its ground truth, then each method's map thresholded
    at 0.5, tinted red over the image with the ground truth outlined in yellow (a truth of
    ``None``: the image has none). ``methods`` holds ``(label, maps)`` with one map per image.
    Returns the written PNG path."""
    if not images:
        raise ValueError(f"save_method_comparison: no image to draw into {path}")
    for label, maps in methods:
        if len(maps) != len(images):
            raise ValueError(
                f"save_method_comparison: {label} has {len(maps)} maps for {len(images)} images"
            )
    titles = ["image", "ground truth", *(label for label, _ in methods)]
    height, width = np.asarray(images[0]).shape[:2]
    panel = 2.2
    fig = Figure(
        figsize=(panel * len(titles), panel * height / width * len(images) + 0.6),
        layout="constrained",
    )
    axes = np.atleast_2d(fig.subplots(len(images), len(titles)))
    for row, (image, truth) in enumerate(zip(images, truths)):
        image = np.asarray(image)
        truth = None if truth is None else np.asarray(truth, dtype=float)
        regions = [None, truth] + [
            (np.asarray(maps[row], dtype=float) >= 0.5).astype(float) for _, maps in methods
        ]
        for column, region in enumerate(regions):
            ax = axes[row, column]
            if region is None:
                ax.imshow(image)
            else:
                _region_overlay(ax, image, region, truth)
            if row == 0:
                ax.set_title(textwrap.fill(titles[column], 22), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_mask_histograms(
    inside_values: np.ndarray | torch.Tensor,
    outside_values: np.ndarray | torch.Tensor,
    path: str | Path,
    bins: int = 50,
    log_y: bool = False,
    title: str | None = None,
) -> Path:
    """Density-normalised histograms, on [0, 1], of predicted mask values at pixels inside and
    outside the ground-truth foreground (log y axis with ``log_y``). Returns the PNG path."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = []
    for name, group in (("outside", outside_values), ("inside", inside_values)):
        array = np.asarray(torch.as_tensor(group).detach().cpu(), dtype=float).ravel()
        if array.size == 0 or not ((array >= 0) & (array <= 1)).all():
            raise ValueError(
                f"plot_mask_histograms: values {name} the ground truth must be "
                f"non-empty and in [0, 1] ({array.size} given) for {path}"
            )
        counts.append(np.histogram(array, bins=edges)[0])
    return plot_score_histograms(np.stack(counts), path, log_y=log_y, title=title)


def plot_score_histograms(
    counts: np.ndarray | torch.Tensor,
    path: str | Path,
    log_y: bool = False,
    title: str | None = None,
) -> Path:
    """Density-normalised histograms from pixel counts per bin of [0, 1]: row 0 for pixels
    outside the ground-truth foreground, row 1 inside (the state of ``PxAPMeter``)."""
    counts = np.asarray(torch.as_tensor(counts).cpu(), dtype=float)
    if counts.ndim != 2 or len(counts) != 2 or (counts.sum(axis=1) == 0).any():
        raise ValueError(
            f"plot_score_histograms: need 2 x bins counts with pixels in both rows "
            f"for {path}, got shape {counts.shape}"
        )
    edges = np.linspace(0.0, 1.0, counts.shape[1] + 1)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    rows = (
        ("inside the ground truth", counts[1], "tab:red"),
        ("outside the ground truth", counts[0], "tab:blue"),
    )
    for name, row, color in rows:
        density = row / (row.sum() * np.diff(edges))
        ax.stairs(
            density, edges, fill=True, alpha=0.4, color=color, label=f"{name} ({int(row.sum())} px)"
        )
        ax.stairs(density, edges, color=color)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("predicted mask value")
    ax.set_ylabel("density")
    ax.set_title(title or "predicted mask values")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper center")
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda stream: fig.savefig(stream, format="png", dpi=100))
    return path
