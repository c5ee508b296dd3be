"""Ablations of the min-max entropy model in the transfer protocol, on the validation split.

    python -m deepmil.study [--seed 0] [--exp-root DIR] [--compare-root DIR] [--out DIR]

Each variant is a shipped ``synthetic-transfer-*`` configuration with a few keys changed
(``train_deepmil.py --set``), trained with one seed. Three questions, one figure each:

* ``erasing``: when recursive erasing starts (never, epoch 1 as in the paper, epoch 4);
* ``normalisation``: the mask min-max normalised over the whole batch (the paper) or per sample;
* ``pooling``: WILDCAT dropout 0.75 (the paper's) against none, with k = 1 selected cell (4x4
  classifier map, 256-px images) and k = 2 (5x5 map, 320-px images; kmax 0.09 of 25 cells),
  beside CAM at both sizes (so that a gain of the larger images is not read as the method's).

The variants equal to a shipped configuration are the comparison's own runs
(``deepmil.compare``, its ``--exp-root``): reused when there, trained as the comparison trains
them otherwise. Settings are
compared on the validation split only (the split that selects a run's epoch), never on test.
Writes ``synthetic-transfer-study.md`` (one table per question) and
``synthetic-transfer-study-<question>.png`` (per-epoch validation error of both heads, F1-,
mask area against the ground truth's, and the training loss terms) to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deepmil import compare, files, report
from deepmil.errors import DeepMILError

SPLIT = "valid"
NAME = "synthetic-transfer-study"
SIZE_320 = (
    "synthetic.image_size=320",
    "fold_name=synthetic-320",
    "crop_size=[320, 320]",
)


@dataclass(frozen=True)
class Variant:
    """One trained setting: a shipped transfer configuration and the keys it changes."""

    name: str
    label: str
    config: str
    changes: tuple[str, ...] = ()


NO_ERASING = Variant("minmax-no-erasing", "no erasing (shipped)", "no-erasing")
ERASING = Variant("minmax-4-erasing", "4 erasing passes from epoch 1 (shipped)", "4-erasing")
QUESTIONS: dict[str, tuple[str, tuple[Variant, ...]]] = {
    "erasing": (
        "When recursive erasing starts",
        (
            NO_ERASING,
            ERASING,
            Variant(
                "erasing-from-epoch-4",
                "4 erasing passes from epoch 4",
                "4-erasing",
                ("epoch_start_erasing=4",),
            ),
        ),
    ),
    "normalisation": (
        "Batch-wide against per-sample min-max normalisation of the mask",
        (
            Variant("minmax-no-erasing", "batch-wide (shipped)", "no-erasing"),
            Variant(
                "sample-normalisation",
                "per sample",
                "no-erasing",
                ("model.mask_normalization=sample",),
            ),
        ),
    ),
    "pooling": (
        "WILDCAT dropout with k = 1 (256 px, 4x4 map) against k = 2 (320 px, 5x5 map)",
        (
            Variant("minmax-no-erasing", "256 px, k = 1, dropout 0.75 (shipped)", "no-erasing"),
            Variant("dropout-0", "256 px, k = 1, dropout 0", "no-erasing", ("model.dropout=0.0",)),
            Variant("320px", "320 px, k = 2, dropout 0.75", "no-erasing", SIZE_320),
            Variant(
                "320px-dropout-0",
                "320 px, k = 2, dropout 0",
                "no-erasing",
                (*SIZE_320, "model.dropout=0.0"),
            ),
            Variant("cam", "CAM, 256 px (reference)", "cam"),
            Variant("cam-320px", "CAM, 320 px (reference)", "cam", SIZE_320),
        ),
    ),
}


def shipped(variant: Variant) -> bool:
    """True for a variant that is a shipped configuration unchanged (a comparison run)."""
    return not variant.changes


def set_options(changes: tuple[str, ...]) -> list[str]:
    """``--set key=value`` arguments of ``train_deepmil.py`` for ``changes``."""
    return [argument for change in changes for argument in ("--set", change)]


def train_variant(variant: Variant, seed: int, roots: dict[bool, Path], extra: list[str]) -> Path:
    """Train (or reuse) ``variant`` with ``seed``; returns its experiment folder. A shipped
    variant is a comparison run and is trained as the comparison trains it (with the CRF); the
    changed ones skip the CRF, which the study does not report."""
    yaml_name = compare.config_name("transfer", variant.config)
    options = extra + set_options(variant.changes)
    root = roots[shipped(variant)]
    return compare.run_setting(variant.name, yaml_name, seed, root, options, crf=shipped(variant))


def question_settings(variants: tuple[Variant, ...], folders: dict[str, Path]) -> list:
    """One report row per variant, labelled by the variant, with its validation metrics."""
    settings = []
    for variant in variants:
        run = report.read_run(folders[variant.name], SPLIT)
        settings.append(report.Setting(run.config["dataset"], variant.label, [run]))
    return settings


def study_markdown(tables: dict[str, str], seed: int) -> str:
    """The study's Markdown: one titled table per question."""
    parts = [f"# Transfer-protocol ablations of min-max entropy, seed {seed}, validation split\n"]
    for question, table in tables.items():
        title = QUESTIONS[question][0]
        body = table.split("\n", 2)[2]  # drop report's own heading line and its blank line
        parts.append(f"## {title}\n\n{body}")
    return "\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The study's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--questions",
        nargs="+",
        choices=tuple(QUESTIONS),
        default=list(QUESTIONS),
        help="which ablations to run (default: all)",
    )
    parser.add_argument(
        "--exp-root",
        type=Path,
        default=Path("exps/study/transfer"),
        help="where the changed variants go (default: exps/study/transfer)",
    )
    parser.add_argument(
        "--compare-root",
        type=Path,
        default=Path("exps/compare/transfer"),
        help="runs of the shipped configurations, shared with deepmil.compare "
        "(default: exps/compare/transfer)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of the tables and figures (default: --exp-root)",
    )
    parser.add_argument("--data-root", default=None, help="passed on to train_deepmil.py")
    parser.add_argument("--cudaid", default="cpu", help="device of the runs (default: cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train (or reuse) every variant of the chosen questions, then write tables and figures."""
    args = parse_args(argv)
    roots = {True: args.compare_root.resolve(), False: args.exp_root.resolve()}
    out = (args.out or args.exp_root).resolve()
    extra = ["--cudaid", args.cudaid] + (["--data-root", args.data_root] if args.data_root else [])
    began = time.perf_counter()
    folders: dict[str, Path] = {}
    for question in args.questions:
        print(question, flush=True)
        for variant in QUESTIONS[question][1]:
            if variant.name not in folders:
                folders[variant.name] = train_variant(variant, args.seed, roots, extra)
    print(f"all runs: {time.perf_counter() - began:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tables = {}
    for question in args.questions:
        settings = question_settings(QUESTIONS[question][1], folders)
        tables[question] = report.markdown_tables(settings, SPLIT)
        figure = report.curves_figure(settings, out / f"{NAME}-{question}.png")
        print(f"figure: {figure}")
    markdown = study_markdown(tables, args.seed)
    print(markdown, end="")
    files.write_text(markdown, out / f"{NAME}.md")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DeepMILError, OSError) as error:
        sys.exit(f"error: {error}")
