"""Gather experiment folders into the paper's comparison table and a qualitative figure.

    python -m deepmil.report EXP_DIR [EXP_DIR ...] [--markdown F] [--latex F] [--figure F]

Each folder is a finished run of ``train_deepmil.py`` (``config.yaml`` and
``final_metrics.json``), or a folder holding such runs at any depth (e.g. ``exps``). Runs whose configurations differ only in run-specific keys (seed, paths,
workers...) form one setting: its row gives the mean ± sample standard deviation over the runs
(the bare value for a single run) of the classification error (and, for min-max entropy, the
localizer head's own), F1+, F1-, PxAP and, when the runs
were evaluated with the CRF, F1+ and F1- after the CRF. One table per dataset; rows follow the
order all-ones, CAM, Grad-CAM, WILDCAT, min-max entropy (by number of erasing passes).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepmil import files, plots
from deepmil.config import IGNORED_KEYS, RUN_OPTIONS, default_values, merge_sections
from deepmil.errors import DeepMILError
from deepmil.experiment import load_prediction_samples
from deepmil.registry import METHOD_NAMES, METHODS

COLUMNS = (
    ("cl_error", "cl. error (%)", r"cl. error (\%)"),
    ("localizer_cl_error", "localizer cl. error (%)", r"localizer cl. error (\%)"),
    ("f1_pos", "F1+ (%)", r"F1$^+$ (\%)"),
    ("f1_neg", "F1- (%)", r"F1$^-$ (\%)"),
    ("iou", "IoU (%)", r"IoU (\%)"),
    ("pxap", "PxAP (%)", r"PxAP (\%)"),
    ("crf_f1_pos", "CRF F1+ (%)", r"CRF F1$^+$ (\%)"),
    ("crf_f1_neg", "CRF F1- (%)", r"CRF F1$^-$ (\%)"),
    ("crf_iou", "CRF IoU (%)", r"CRF IoU (\%)"),
)
NOT_COMPARED = frozenset(RUN_OPTIONS + IGNORED_KEYS)
CURVE_PANELS = (
    ("valid_cl_error", "validation classification error (%)"),
    ("valid_localizer_cl_error", "validation error of the localizer head (%)"),
    ("valid_f1_neg", "validation F1- (%)"),
    ("valid_mask_area", "validation mask area, R+ >= 0.5 (% of the image)"),
    ("train_loss_pos", "training L_pos (positive region, CE)"),
    ("train_loss_neg", "training L_neg (negative region, CE to uniform)"),
    ("train_loss_seg", "training L_seg (localizer head, CE)"),
    ("train_loss_cl", "training L_cl (baselines, CE)"),
)
CURVE_REFERENCES = {"valid_mask_area": ("valid_truth_area", "ground truth")}
FIGURE_IMAGES = 4
STORED_IMAGES = 6
LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "_": r"\_",
    "%": r"\%",
    "&": r"\&",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
}


class ReportError(DeepMILError, ValueError):
    """A folder or file given to the report cannot be used."""


@dataclass
class Run:
    """One finished experiment: its folder, configuration and metrics of one evaluated set."""

    folder: Path
    config: dict
    metrics: dict


@dataclass
class Setting:
    """The runs of one configuration (all seeds), shown as one row."""

    dataset: str
    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        """The seeds of the setting's runs."""
        return [run.config["MYSEED"] for run in self.runs]


def experiment_folders(paths: list[Path]) -> list[Path]:
    """The run folders named by ``paths``: a folder with a ``config.yaml`` is one run, any other
    folder stands for the finished runs found inside it, in sorted order."""
    folders = []
    for path in paths:
        if (path / "config.yaml").is_file() or not path.is_dir():
            folders.append(path)
            continue
        found = sorted(
            metrics.parent
            for metrics in path.rglob("final_metrics.json")
            if (metrics.parent / "config.yaml").is_file()
        )
        if not found:
            raise ReportError(
                f"{path}: no finished experiment (config.yaml and final_metrics.json) inside"
            )
        folders += found
    return folders


def read_run(folder: Path, split: str) -> Run:
    """The configuration (keys it lacks, e.g. from an older version, get their defaults) and the
    ``split`` metrics of the experiment in ``folder``."""
    files = {name: folder / name for name in ("config.yaml", "final_metrics.json")}
    for path in files.values():
        if not path.is_file():
            raise ReportError(f"{folder}: {path.name} not found; is it a finished experiment?")
    config = yaml.safe_load(files["config.yaml"].read_text(encoding="utf-8"))
    final = json.loads(files["final_metrics.json"].read_text(encoding="utf-8"))
    if split not in final:
        raise ReportError(
            f"{files['final_metrics.json']}: no '{split}' metrics "
            f"(found {', '.join(sorted(final))})"
        )
    return Run(folder, merge_sections(default_values(), config), final[split])


def method_label(config: dict) -> str:
    """Row label: the baseline's name, or the min-max entropy model and its erasing passes."""
    info = METHODS[config["method"]]
    if not info.erases:
        return info.label
    passes = config["nbr_times_erase"]
    return f"{info.label}, {passes} erasing passes" if passes else f"{info.label}, no erasing"


def setting_key(config: dict) -> str:
    """The configuration without its run-specific keys, as comparable text."""
    return json.dumps(flatten(config), sort_keys=True)


def row_rank(setting: Setting) -> tuple:
    """Sort key: dataset, then the paper's row order, then the number of erasing passes."""
    config = setting.runs[0].config
    return (
        setting.dataset,
        METHOD_NAMES.index(config["method"]),
        config["nbr_times_erase"],
        setting.label,
    )


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, run-specific and ignored keys left out."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if f"{prefix}{key}" in NOT_COMPARED:
            continue
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def distinguish(settings: list[Setting]) -> None:
    """Append to each label the keys whose values tell settings with that label apart."""
    flats = [flatten(setting.runs[0].config) for setting in settings]
    keys = sorted({key for flat in flats for key in flat})
    differing = [key for key in keys if len({json.dumps(flat.get(key)) for flat in flats}) > 1]
    for setting, flat in zip(settings, flats):
        setting.label += " [" + ", ".join(f"{key}={flat.get(key)}" for key in differing) + "]"


def group_runs(runs: list[Run]) -> list[Setting]:
    """Settings in table order; settings that share a label get their differing keys added."""
    settings: dict[str, Setting] = {}
    for run in runs:
        key = setting_key(run.config)
        if key not in settings:
            settings[key] = Setting(run.config["dataset"], method_label(run.config))
        settings[key].runs.append(run)
    same_label: dict[tuple[str, str], list[Setting]] = {}
    for setting in settings.values():
        setting.runs.sort(key=lambda run: run.config["MYSEED"])
        same_label.setdefault((setting.dataset, setting.label), []).append(setting)
    for group in same_label.values():
        if len(group) > 1:
            distinguish(group)
    return sorted(settings.values(), key=row_rank)


def mean_and_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


def cell(setting: Setting, key: str, latex: bool) -> str:
    """``mean ± std`` of ``key`` over the setting's runs; a dash when a run lacks it."""
    values = [run.metrics.get(key) for run in setting.runs]
    if any(value is None or not math.isfinite(value) for value in values):
        return "--" if latex else "–"
    mean, std = mean_and_std([float(value) for value in values])
    if std is None:
        return f"{mean:.2f}"
    return f"${mean:.2f} \\pm {std:.2f}$" if latex else f"{mean:.2f} ± {std:.2f}"


def shown_columns(settings: list[Setting]) -> list[tuple[str, str, str]]:
    """The columns, without the CRF ones when no run was evaluated with the CRF."""
    return [
        column
        for column in COLUMNS
        if any(column[0] in run.metrics for setting in settings for run in setting.runs)
    ]


def by_dataset(settings: list[Setting]) -> dict[str, list[Setting]]:
    """The settings of each dataset, in order."""
    grouped: dict[str, list[Setting]] = {}
    for setting in settings:
        grouped.setdefault(setting.dataset, []).append(setting)
    return grouped


def seeds_text(setting: Setting) -> str:
    """``0,1,2``."""
    return ",".join(str(seed) for seed in setting.seeds)


def markdown_tables(settings: list[Setting], split: str) -> str:
    """One Markdown table per dataset."""
    parts = []
    for dataset, rows in by_dataset(settings).items():
        columns = shown_columns(rows)
        lines = [
            f"### {dataset}: {split} set, mean ± std over seeds",
            "",
            "| method | seeds | " + " | ".join(title for _, title, _ in columns) + " |",
            "|---|---|" + "---:|" * len(columns),
        ]
        for setting in rows:
            cells = " | ".join(cell(setting, key, latex=False) for key, _, _ in columns)
            lines.append(f"| {setting.label} | {seeds_text(setting)} | {cells} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def latex_text(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(LATEX_SPECIALS.get(character, character) for character in text)


def latex_tables(settings: list[Setting], split: str) -> str:
    """One ``booktabs`` LaTeX table per dataset."""
    parts = []
    for dataset, rows in by_dataset(settings).items():
        columns = shown_columns(rows)
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            r"\begin{tabular}{ll" + "r" * len(columns) + "}",
            r"\toprule",
            "Method & Seeds & " + " & ".join(title for _, _, title in columns) + r" \\",
            r"\midrule",
        ]
        for setting in rows:
            cells = " & ".join(cell(setting, key, latex=True) for key, _, _ in columns)
            lines.append(f"{latex_text(setting.label)} & {seeds_text(setting)} & {cells} \\\\")
        lines += [
            r"\bottomrule",
            r"\end{tabular}",
            f"\\caption{{{dataset}: {split} set, mean $\\pm$ standard deviation over seeds.}}",
            r"\end{table}",
        ]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def figure_samples(setting: Setting) -> list[dict]:
    """The stored test predictions of the setting's first run (lowest seed)."""
    path = setting.runs[0].folder / "test_predictions.npz"
    if not path.is_file():
        raise ReportError(
            f"{setting.runs[0].folder}: {path.name} not found (written by the "
            f"final evaluation); cannot draw the comparison figure"
        )
    return load_prediction_samples(path)


def comparison_figure(settings: list[Setting], path: Path, images: int) -> list[Path]:
    """Image, ground truth and every setting's mask on the same test images, per dataset."""
    grouped = by_dataset(settings)
    written = []
    for dataset, rows in grouped.items():
        target = path if len(grouped) == 1 else path.with_name(f"{path.stem}-{dataset}.png")
        samples = {setting.label: figure_samples(setting)[:images] for setting in rows}
        reference = next(iter(samples.values()))
        indices = [sample["index"] for sample in reference]
        for label, chosen in samples.items():
            if [sample["index"] for sample in chosen] != indices:
                raise ReportError(
                    f"{label}: its stored test images {[s['index'] for s in chosen]}"
                    f" differ from {indices}; the runs used different test sets"
                )
        methods = [
            (label, [sample["pred_mask"] for sample in chosen]) for label, chosen in samples.items()
        ]
        written.append(
            plots.save_method_comparison(
                [sample["image"] for sample in reference],
                [sample.get("gt_mask") for sample in reference],
                methods,
                target,
                title=f"{dataset}: test images, masks thresholded at 0.5",
            )
        )
    return written


def read_history(folder: Path) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl`` (none for an evaluation-only run)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def curves_figure(settings: list[Setting], path: Path) -> Path:
    """Per-epoch validation metrics, mask area and training loss terms of every trained
    setting, averaged over its seeds (the post-hoc settings have no epochs)."""
    histories = {
        setting.label: [read_history(run.folder) for run in setting.runs] for setting in settings
    }
    histories = {label: runs for label, runs in histories.items() if any(runs)}
    if not histories:
        raise ReportError(f"no run has a metrics.jsonl; cannot draw {path}")
    return plots.plot_comparison_curves(histories, CURVE_PANELS, path, CURVE_REFERENCES)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The report's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, metavar="EXP_DIR")
    parser.add_argument("--split", default="test", choices=("test", "valid", "train_eval"))
    parser.add_argument("--markdown", type=Path, help="write the Markdown table(s) here")
    parser.add_argument("--latex", type=Path, help="write the LaTeX table(s) here")
    parser.add_argument("--figure", type=Path, help="write the comparison figure (PNG) here")
    parser.add_argument(
        "--curves",
        type=Path,
        help="write the per-epoch curves (validation metrics, mask area, loss terms; PNG) here",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=FIGURE_IMAGES,
        choices=range(1, STORED_IMAGES + 1),
        metavar=f"1..{STORED_IMAGES}",
        help=f"test images in the figure (default {FIGURE_IMAGES}; every run stores the same "
        f"first {STORED_IMAGES}, then its own misclassified and lowest-F1+ ones)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print (and write) the tables, draw the figure; 1 on an unusable folder or file."""
    args = parse_args(argv)
    try:
        runs = [read_run(folder, args.split) for folder in experiment_folders(args.folders)]
        settings = group_runs(runs)
        markdown = markdown_tables(settings, args.split)
        print(markdown, end="")
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            files.write_text(markdown, args.markdown)
        if args.latex:
            args.latex.parent.mkdir(parents=True, exist_ok=True)
            files.write_text(latex_tables(settings, args.split), args.latex)
        if args.figure:
            for path in comparison_figure(settings, args.figure, args.images):
                print(f"figure: {path}")
        if args.curves:
            print(f"curves: {curves_figure(settings, args.curves)}")
    except (ReportError, OSError, yaml.YAMLError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
