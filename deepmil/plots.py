"""Figures: learning curves, prediction panels and mask-value histograms written as PNG files.

Each figure is built by a ``*_figure`` function that returns a ``matplotlib.figure.Figure``
(rendered by Agg, never registered with pyplot), so no global backend or figure state is
touched; its ``plot_*`` / ``save_*`` twin writes it and returns the path.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import patheffects, rcParams
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from deepmil.files import atomic_write

TRUTH_OUTLINE = "yellow"
OUTLINE_STROKE = [patheffects.withStroke(linewidth=3.0, foreground="black")]
TRUTH_FILL = "gold"
PREDICTION_FILL = "red"
FILL_ALPHA = 0.45
MAP_COLORMAP = "viridis"
MISCLASSIFIED_COLOR = "tab:red"
REGION_COLORMAP = "Reds"
REGION_ALPHA = 0.55
PANEL_TITLES = ("image", "ground truth", "prediction (R+ >= 0.5)", "continuous R+")
NO_TRUTH_TITLE = "no ground truth"
CRF_TITLE = "CRF-refined (>= 0.5)"
PANELS_KEY = (
    "yellow outline: ground truth; red: predicted region (over the image in grey); "
    "red caption: misclassified"
)
MOVING_WINDOW = 20
OUTLIER_FACTOR = 5.0
SPLIT_STYLES = {"train": "-", "valid": "--"}
LOSS_TITLES = {
    "loss": "total loss",
    "loss_seg": "L_seg (localizer head, CE)",
    "loss_pos": "L_pos (positive region, CE)",
    "loss_neg": "L_neg (negative region, CE to uniform)",
    "loss_cl": "L_cl (baselines, CE)",
}
LINE_DETAILS = {
    "localizer_cl_error": "localizer head",
    "loss_seg_pass_mean": "mean over erasing passes",
    "f1_pos": "F1+",
    "f1_neg": "F1-",
    "f1_pos_all_ones": "F1+ of an all-ones mask",
}
SELECTED_STYLE = {"color": "black", "linestyle": "-", "linewidth": 1.2, "alpha": 0.6}
ERASING_STYLE = {"color": "tab:purple", "linestyle": ":", "linewidth": 1.8}
DEFAULT_THRESHOLD = 0.5


# ----------------------------------------------------------------------------- learning curves


@dataclass(frozen=True)
class CurvePanel:
    """One panel of the learning curves: its title, y-axis label and history keys, the quantity
    its line labels leave unsaid (``family``), and whether its values are percentages (``%``
    ticks) or drawn on a log scale."""

    title: str
    ylabel: str
    keys: tuple[str, ...]
    family: str | None = None
    percent: bool = False
    log: bool = False


def _split_of(key: str) -> tuple[str | None, str]:
    """``"valid_loss_pos"`` -> ``("valid", "loss_pos")``; ``"lr"`` -> ``(None, "lr")``."""
    split, _, name = key.partition("_")
    return (split, name) if split in SPLIT_STYLES and name else (None, key)


def _loss_family(key: str) -> str:
    """The loss of a key, whatever its split (``train_loss_seg_pass_mean``: ``loss_seg``)."""
    return _split_of(key)[1].removesuffix("_pass_mean")


def _line_label(key: str, family: str | None) -> str:
    """``"valid"``, ``"train, mean over erasing passes"``, ``"valid, F1+"``..."""
    split, name = _split_of(key)
    detail = "" if name == family else LINE_DETAILS.get(name, name)
    return ", ".join(part for part in (split, detail) if part)


def _is_lr(key: str) -> bool:
    return key == "lr" or key.endswith("_lr")


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


def _constant(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return len(finite) > 0 and bool((finite == finite[0]).all())


def curve_panels(history: Sequence[Mapping[str, object]]) -> list[CurvePanel]:
    """The panels of :func:`learning_curves_figure`: one per loss (its training and validation
    values together), the classification errors, the F1 values, and the learning rate unless
    it is constant. Keys without any finite value are left out."""
    keys = sorted({key for entry in history for key in entry if key != "epoch"})
    drawn = [
        key
        for key in keys
        if ("loss" in key or "error" in key or "f1" in key or _is_lr(key))
        and np.isfinite(_series(history, key)).any()
    ]
    families = {_loss_family(key) for key in drawn if "loss" in key}
    ordered = [name for name in LOSS_TITLES if name in families] + sorted(
        families - set(LOSS_TITLES)
    )
    panels = [
        CurvePanel(
            LOSS_TITLES.get(family, family),
            "loss",
            tuple(key for key in drawn if "loss" in key and _loss_family(key) == family),
            family,
        )
        for family in ordered
    ]
    groups = (
        ("classification error", "error", "cl_error", "error"),
        ("localisation (threshold 0.5)", "F1", None, "f1"),
    )
    for title, ylabel, family, word in groups:
        chosen = tuple(key for key in drawn if word in key and "loss" not in key)
        if chosen:
            panels.append(CurvePanel(title, ylabel, chosen, family, percent=True))
    rates = tuple(key for key in drawn if _is_lr(key))
    if rates and not all(_constant(_series(history, key)) for key in rates):
        panels.append(CurvePanel("learning rate", "lr", rates, log=True))
    return panels


def outlier_limits(values: np.ndarray) -> tuple[float, float] | None:
    """y limits that leave out the largest of ``values`` when it alone would stretch the axis
    over more than ``OUTLIER_FACTOR`` times the span of the others (at least 3 finite values);
    None when the axis can show every value."""
    finite = np.sort(values[np.isfinite(values)])
    if len(finite) < 3:
        return None
    low, rest, top = finite[0], finite[-2], finite[-1]
    span = rest - low
    if top - low <= OUTLIER_FACTOR * span:
        return None
    margin = 0.08 * span if span > 0 else 0.1 * max(abs(rest), 1.0)
    return low - margin, rest + margin


def _moving_median(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing median over up to ``window`` previous values (NaNs ignored), which a lone
    outlier does not drag along."""
    out = np.full_like(values, np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        if np.isfinite(chunk).any():
            out[i] = np.nanmedian(chunk)
    return out


def _draw_panel(
    ax: Axes, panel: CurvePanel, epochs: np.ndarray, history: Sequence[Mapping[str, object]]
) -> None:
    """The panel's lines: one colour per quantity, the split as line style; a lone outlier is
    left off the axis and marked by a triangle at its top edge with its value."""
    smooth = len(history) > MOVING_WINDOW and not panel.log
    colours: dict[str, str] = {}
    drawn = []
    for key in panel.keys:
        values = _series(history, key)
        split, name = _split_of(key)
        colour = colours.setdefault(name, f"C{len(colours)}")
        drawn.append((colour, values))
        style = SPLIT_STYLES.get(split or "", "-")
        label = _line_label(key, panel.family) or key
        if smooth:
            ax.plot(epochs, values, color=colour, linewidth=0.8, alpha=0.3)
            values = _moving_median(values, MOVING_WINDOW)
        ax.plot(
            epochs,
            values,
            color=colour,
            linestyle=style,
            marker="." if len(values) < 50 else None,
            label=label,
        )
    limits = None if panel.log else outlier_limits(np.concatenate([v for _, v in drawn]))
    if limits is not None:
        ax.set_ylim(*limits)
        middle = (np.nanmin(epochs) + np.nanmax(epochs)) / 2
        for colour, values in drawn:
            for epoch, value in zip(epochs, values):
                if value > limits[1]:
                    right = epoch > middle
                    ax.plot(epoch, limits[1], marker="^", color=colour, clip_on=False)
                    ax.annotate(
                        f"{value:.3g}",
                        (epoch, limits[1]),
                        xytext=(-5 if right else 5, -11),
                        textcoords="offset points",
                        ha="right" if right else "left",
                        fontsize=8,
                        color=colour,
                    )
    if panel.log:
        ax.set_yscale("log")
    if panel.percent:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    title = panel.title
    if smooth:
        title += f" ({MOVING_WINDOW}-epoch moving median; faint: per epoch)"
    if limits is not None:
        title += " (clipped: ▲ above the axis)"
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(panel.ylabel)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def learning_curves_figure(
    history: Sequence[Mapping[str, object]],
    selected_epoch: int | None = None,
    erasing_start: int | None = None,
) -> Figure:
    """Per-epoch statistics, one panel per :func:`curve_panels` (two columns): training values
    solid, validation values dashed. A solid black line marks ``selected_epoch`` and a dotted
    purple one ``erasing_start`` (the first epoch of recursive erasing) on every panel, where
    they lie within the history.

    ``history`` holds one dict per epoch (``epoch``, ``train_loss``, ``valid_cl_error``,
    ``valid_f1_pos``, ``lr``...); missing/None values are gaps. With more than 20 epochs each
    line is a trailing 20-epoch moving median over the faint per-epoch values. A lone outlier
    does not stretch a panel's axis (see :func:`outlier_limits`). A constant learning rate is
    given above the panels instead of a panel of its own.
    """
    if not history:
        raise ValueError("learning curves: empty history, nothing to plot")
    panels = curve_panels(history)
    if not panels:
        keys = sorted({key for entry in history for key in entry})
        raise ValueError(f"learning curves: no plottable key among {keys}")
    epochs = (
        _series(history, "epoch")
        if all("epoch" in entry for entry in history)
        else np.arange(len(history), dtype=float)
    )
    columns = 1 if len(panels) == 1 else 2
    rows = (len(panels) + columns - 1) // columns
    fig = Figure(figsize=(6.5 * columns, 3.0 * rows + 0.7), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    markers = []
    if selected_epoch is not None and epochs.min() <= selected_epoch <= epochs.max():
        markers.append((selected_epoch, SELECTED_STYLE, f"selected epoch {selected_epoch}"))
    if erasing_start is not None and epochs.min() <= erasing_start <= epochs.max():
        markers.append((erasing_start, ERASING_STYLE, f"erasing from epoch {erasing_start}"))
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, epochs, history)
        for epoch, style, _ in markers:
            ax.axvline(epoch, **style)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], **style, label=label) for _, style, label in markers]
    handles += [
        Line2D([], [], color="grey", linestyle=style, label=split)
        for split, style in SPLIT_STYLES.items()
    ]
    rates = sorted({key for entry in history for key in entry if _is_lr(key)})
    constant = [key for key in rates if _constant(_series(history, key))]
    note = None
    if constant and not any(panel.log for panel in panels):
        values = ", ".join(f"{key} {np.nanmax(_series(history, key)):.3g}" for key in constant)
        note = f"constant learning rate: {values}"
    fig.legend(
        handles=handles,
        loc="outside upper center",
        ncols=len(handles),
        fontsize=9,
        title=note,
        title_fontsize=9,
    )
    return fig


def plot_learning_curves(
    history: Sequence[Mapping[str, object]],
    path: str | Path,
    selected_epoch: int | None = None,
    erasing_start: int | None = None,
) -> Path:
    """Write :func:`learning_curves_figure` as a PNG at ``path``; returns the path."""
    return _save(learning_curves_figure(history, selected_epoch, erasing_start), path)


def plot_comparison_curves(
    histories: Mapping[str, Sequence[Sequence[Mapping[str, object]]]],
    panels: Sequence[tuple[str, str]],
    path: str | Path,
    references: Mapping[str, tuple[str, str]] | None = None,
) -> Path:
    """Write :func:`comparison_curves_figure` to ``path``; returns the written path."""
    return _save(comparison_curves_figure(histories, panels, references), path)


def comparison_curves_figure(
    histories: Mapping[str, Sequence[Sequence[Mapping[str, object]]]],
    panels: Sequence[tuple[str, str]],
    references: Mapping[str, tuple[str, str]] | None = None,
) -> Figure:
    """Per-epoch curves of several settings, one panel per ``(key, title)`` of ``panels``.

    ``histories`` maps a setting's label to its runs' histories (one dict per epoch, as in
    ``metrics.jsonl``); each line is the mean over the runs, shaded between their minimum and
    maximum, in the setting's colour on every panel. Settings without the panel's key are left
    out of it. ``references`` maps a panel's key to ``(key, label)`` of a value drawn dotted in
    black on it, averaged over every run (e.g. the ground truth's area on the mask-area panel).
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
    colours = setting_colours(list(histories))
    for ax, (key, title) in zip(axes, drawn):
        for label, runs in histories.items():
            series = [_series(run, key) for run in runs if any(key in entry for entry in run)]
            if series:
                _mean_band(ax, series, label, colours[label])
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
    return fig


def _stacked(series: Sequence[np.ndarray]) -> np.ndarray:
    """Equal-length rows (shorter ones padded with NaN)."""
    length = max(len(values) for values in series)
    out = np.full((len(series), length), np.nan)
    for row, values in zip(out, series):
        row[: len(values)] = values
    return out


def setting_colours(labels: Sequence[str]) -> dict[str, str]:
    """One colour per setting, the same on every panel (matplotlib's default cycle)."""
    cycle = rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[index % len(cycle)] for index, label in enumerate(labels)}


def _mean_band(ax: Axes, series: Sequence[np.ndarray], label: str, colour: str) -> None:
    """The mean of ``series`` per epoch in ``colour``, shaded between their minimum and maximum."""
    stacked = _stacked(series)
    epochs = np.arange(stacked.shape[1])
    ax.plot(epochs, np.nanmean(stacked, axis=0), marker=".", label=label, color=colour)
    if len(series) > 1:
        low, high = np.nanmin(stacked, axis=0), np.nanmax(stacked, axis=0)
        ax.fill_between(epochs, low, high, color=colour, alpha=0.15)


# ----------------------------------------------------------------------------- prediction panels


def denormalize_image(tensor: torch.Tensor) -> np.ndarray:
    """``3 x H x W`` image normalised with mean 0.5 / std 0.5 -> ``H x W x 3`` uint8 array."""
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"denormalize_image expects a 3xHxW tensor, got {tuple(tensor.shape)}")
    pixels = (tensor.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(1, 2, 0).numpy()


def _check_sample(index: int, sample: Mapping[str, object]) -> None:
    missing = [k for k in ("image", "pred_mask", "caption") if k not in sample]
    if missing:
        raise ValueError(f"mask panels: sample {index} lacks keys {missing}")
    image = np.asarray(sample["image"])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"mask panels: sample {index} image must be an HxWx3 uint8 array, "
            f"got shape {image.shape} dtype {image.dtype}"
        )
    for key in ("gt_mask", "pred_mask", "crf_mask"):
        if key in sample and np.asarray(sample[key]).shape != image.shape[:2]:
            raise ValueError(
                f"mask panels: sample {index} {key} has shape "
                f"{np.asarray(sample[key]).shape}, image is {image.shape[:2]}"
            )


def _outline(ax: Axes, truth: np.ndarray | None) -> None:
    """The outline of ``truth`` (>= 0.5) in yellow on a black stroke (nothing without a ground
    truth or when it is all one value)."""
    if truth is not None and truth.min() < 0.5 <= truth.max():
        contours = ax.contour(truth, levels=[0.5], colors=TRUTH_OUTLINE, linewidths=1.5)
        contours.set_path_effects(OUTLINE_STROKE)


def _grey(ax: Axes, image: np.ndarray) -> None:
    """``image`` in light grey, a backdrop on which a single-colour fill stands out."""
    luminance = image.astype(float) @ np.array([0.299, 0.587, 0.114])
    ax.imshow(luminance, cmap="gray", vmin=-160, vmax=300, interpolation="nearest")


def _fill(ax: Axes, region: np.ndarray, colour: str) -> None:
    """``region`` (>= 0.5) filled with ``colour`` over the grey image, and its outline."""
    rgba = np.zeros((*region.shape, 4))
    rgba[..., :3] = to_rgb(colour)
    rgba[..., 3] = FILL_ALPHA * (region >= 0.5)
    ax.imshow(rgba, interpolation="nearest")
    if region.min() < 0.5 <= region.max():
        ax.contour(region, levels=[0.5], colors=colour, linewidths=1.0)


def _draw_row(row: Figure, sample: Mapping[str, object], columns: int) -> None:
    """One sample's panels and caption (in red for a misclassified image)."""
    image = np.asarray(sample["image"])
    pred = np.asarray(sample["pred_mask"], dtype=float)
    truth = np.asarray(sample["gt_mask"], dtype=float) if "gt_mask" in sample else None
    axes = row.subplots(1, columns)
    axes[0].imshow(image)
    axes[1].set_title(PANEL_TITLES[1] if truth is not None else NO_TRUTH_TITLE, fontsize=9)
    _grey(axes[1], image)
    if truth is not None:
        _fill(axes[1], truth, TRUTH_FILL)
    _grey(axes[2], image)
    _fill(axes[2], pred, PREDICTION_FILL)
    shown = axes[3].imshow(pred, cmap=MAP_COLORMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    row.colorbar(shown, ax=axes[3], ticks=[0.0, 0.5, 1.0], fraction=0.08, pad=0.03)
    if columns == 5:
        _grey(axes[4], image)
        _fill(axes[4], np.asarray(sample["crf_mask"], dtype=float), PREDICTION_FILL)
        note = sample.get("crf_caption")
        axes[4].set_title(f"{CRF_TITLE}\n{note}" if note else CRF_TITLE, fontsize=9)
    for column, ax in enumerate(axes):
        _outline(ax, truth)
        if column in (0, 2, 3):
            ax.set_title(PANEL_TITLES[column], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    colour = MISCLASSIFIED_COLOR if sample.get("correct") is False else "black"
    row.suptitle(str(sample["caption"]), fontsize=10, color=colour)


def mask_panels_figure(samples: Sequence[Mapping[str, object]], title: str | None = None) -> Figure:
    """One row per sample, with its ``caption`` above it (red when ``correct`` is False): the
    image, the ground truth filled in gold, the prediction ``pred_mask >= 0.5`` filled in red
    (both over the image in grey) and the continuous ``pred_mask`` with its colour bar; the
    ground truth is outlined in yellow on every panel. A sample without ``gt_mask`` (an image
    without a ground truth) says so and has no outline. When the samples carry a ``crf_mask``
    (all of them or none), a fifth column fills it like the prediction, titled with the
    sample's ``crf_caption`` (e.g. its F1 values)."""
    if not samples:
        raise ValueError("mask panels: no sample to draw")
    for index, sample in enumerate(samples):
        _check_sample(index, sample)
    with_crf = ["crf_mask" in sample for sample in samples]
    if any(with_crf) and not all(with_crf):
        raise ValueError(
            f"mask panels: 'crf_mask' given for {sum(with_crf)} of "
            f"{len(samples)} samples; give it for all or none"
        )
    columns = len(PANEL_TITLES) + all(with_crf)
    height, width = np.asarray(samples[0]["image"]).shape[:2]
    panel_w = 2.6
    panel_h = max(1.3, min(5.2, panel_w * height / width)) + 0.7
    fig = Figure(
        figsize=(columns * panel_w + 0.6, panel_h * len(samples) + 0.7), layout="constrained"
    )
    rows = np.atleast_1d(fig.subfigures(len(samples), 1))
    for row, sample in zip(rows, samples):
        _draw_row(row, sample, columns)
    heading = f"{title}\n{PANELS_KEY}" if title else PANELS_KEY
    fig.suptitle(heading, fontsize=10)
    return fig


def save_mask_panels(
    samples: Sequence[Mapping[str, object]], path: str | Path, title: str | None = None
) -> Path:
    """Write :func:`mask_panels_figure` as a PNG at ``path``; returns the path."""
    return _save(mask_panels_figure(samples, title), path)


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
    _outline(ax, truth)


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


# ----------------------------------------------------------------------------- histograms


def plot_mask_histograms(
    inside_values: np.ndarray | torch.Tensor,
    outside_values: np.ndarray | torch.Tensor,
    path: str | Path,
    bins: int = 50,
    log_y: bool = False,
    title: str | None = None,
    best_threshold: float | None = None,
) -> Path:
    """Density-normalised histograms, on [0, 1], of predicted mask values at pixels inside and
    outside the ground-truth foreground, as :func:`score_histograms_figure` draws them.
    Returns the PNG path."""
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
    return plot_score_histograms(np.stack(counts), path, log_y, title, best_threshold)


def score_histograms_figure(
    counts: np.ndarray | torch.Tensor,
    log_y: bool = False,
    title: str | None = None,
    best_threshold: float | None = None,
) -> Figure:
    """Density-normalised histograms from pixel counts per bin of [0, 1]: row 0 for pixels
    outside the ground-truth foreground, row 1 inside (the state of ``PxAPMeter``); log y axis
    with ``log_y``. A dashed black line marks the threshold 0.5 of F1+, F1- and IoU, a dotted
    green one ``best_threshold`` (the validation set's best, when given and finite)."""
    counts = np.asarray(torch.as_tensor(counts).cpu(), dtype=float)
    if counts.ndim != 2 or len(counts) != 2 or (counts.sum(axis=1) == 0).any():
        raise ValueError(
            f"score histograms: need 2 x bins counts with pixels in both rows, "
            f"got shape {counts.shape}"
        )
    edges = np.linspace(0.0, 1.0, counts.shape[1] + 1)
    fig = Figure(figsize=(6.5, 4.6), layout="constrained")
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
    ax.axvline(
        DEFAULT_THRESHOLD, color="black", linestyle="--", label="threshold 0.5 (F1+, F1-, IoU)"
    )
    if best_threshold is not None and math.isfinite(best_threshold):
        ax.axvline(
            best_threshold,
            color="tab:green",
            linestyle=":",
            linewidth=2,
            label=f"best validation threshold {best_threshold:.2f}",
        )
    if log_y:
        ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("predicted mask value")
    ax.set_ylabel("density")
    ax.set_title(title or "predicted mask values")
    ax.grid(True, alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncols=2)
    return fig


def plot_score_histograms(
    counts: np.ndarray | torch.Tensor,
    path: str | Path,
    log_y: bool = False,
    title: str | None = None,
    best_threshold: float | None = None,
) -> Path:
    """Write :func:`score_histograms_figure` as a PNG at ``path``; returns the path."""
    return _save(score_histograms_figure(counts, log_y, title, best_threshold), path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda stream: fig.savefig(stream, format="png", dpi=100))
    return path
