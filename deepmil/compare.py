"""Run the whole method comparison on the synthetic dataset, then tabulate it.

    python -m deepmil.compare [--protocol transfer|scratch] [--seeds 0 1 2]
                              [--exp-root DIR] [--out DIR]

Two protocols: ``transfer`` (the default) fine-tunes every method from the trunk pretrained on
the synthetic source task, on 256-px images (``config_yaml/synthetic-transfer-*.yaml``);
``scratch`` trains from random weights on 128-px images (``config_yaml/synthetic-*.yaml``).
For each seed: CAM, WILDCAT, min-max entropy without and with 4 erasing passes are trained with
``train_deepmil.py``; Grad-CAM and the all-ones mask are evaluated post hoc on the CAM classifier
of that seed. Every run evaluates with the CRF too. A run whose ``final_metrics.json`` exists is
reused and an interrupted one is resumed, so the command can be repeated. Finally
``deepmil.report`` prints the table and writes it, with the figure, to ``--out`` (by default the
runs' folder, ``exps/compare/<protocol>``; the tables in ``doc/`` were written with ``--out doc``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from deepmil.errors import DeepMILError, RunError
from deepmil.experiment import REPOSITORY

PROTOCOLS = {"transfer": "synthetic-transfer", "scratch": "synthetic"}
TRAINED = (
    ("cam", "cam"),
    ("wildcat", "wildcat"),
    ("minmax-no-erasing", "no-erasing"),
    ("minmax-4-erasing", "4-erasing"),
)
POST_HOC = (("gradcam", "gradcam"), ("allones", "allones"))
CLASSIFIER_RUN = "cam"


def config_name(protocol: str, setting: str) -> str:
    """The shipped configuration of ``setting`` (``cam``, ``no-erasing``...) in ``protocol``."""
    return f"{PROTOCOLS[protocol]}-{setting}.yaml"


def report_name(protocol: str) -> str:
    """Stem of the table and figure files of ``protocol``."""
    return f"{PROTOCOLS[protocol]}-comparison"


def run_name(setting: str, seed: int) -> str:
    """Folder name of one run of the comparison."""
    return f"{setting}-seed{seed}"


def train_command(yaml_name: str, folder: Path, extra: list[str], crf: bool = True) -> list[str]:
    """``train_deepmil.py`` arguments that start the run in ``folder`` (evaluated with the CRF
    too if ``crf``), or resume it."""
    if (folder / "checkpoint.pt").is_file():
        return ["--resume", str(folder), "--quiet", *device_options(extra)]
    return [
        "--yaml",
        yaml_name,
        *(["--crf"] if crf else []),
        "--exp-root",
        str(folder.parent),
        "--exp-name",
        folder.name,
        "--overwrite",
        "--quiet",
        *extra,
    ]


def device_options(extra: list[str]) -> list[str]:
    """The run options of ``extra`` that a resumed run accepts (``--cudaid``, ``--data-root``)."""
    kept = []
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in ("--cudaid", "--data-root"):
            kept += [flag, value]
    return kept


def run_training(arguments: list[str], seed: int, log: Path) -> None:
    """Run ``train_deepmil.py`` with ``MYSEED = seed``; its output goes to ``log``."""
    env = dict(os.environ, MYSEED=str(seed))
    with open(log, "a", encoding="utf-8") as stream:
        result = subprocess.run(
            [sys.executable, "train_deepmil.py", *arguments],
            cwd=REPOSITORY,
            env=env,
            stdout=stream,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if result.returncode != 0:
        raise RunError(
            f"train_deepmil.py {' '.join(arguments)} failed with exit code "
            f"{result.returncode}; see {log}"
        )


def run_setting(
    setting: str, yaml_name: str, seed: int, root: Path, extra: list[str], crf: bool = True
) -> Path:
    """Train (or reuse) one setting for one seed; returns its experiment folder."""
    folder = root / run_name(setting, seed)
    if (folder / "final_metrics.json").is_file():
        print(f"  {folder.name}: done before, reused", flush=True)
        return folder
    began = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    run_training(train_command(yaml_name, folder, extra, crf), seed, root / f"{folder.name}.log")
    print(f"  {folder.name}: {time.perf_counter() - began:.0f} s", flush=True)
    return folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The comparison's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default="transfer",
        help="transfer: every method from the synthetic pretrained trunk at 256 px (default); "
        "scratch: random weights at 128 px",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--exp-root",
        type=Path,
        default=None,
        help="where the runs go (default: exps/compare/<protocol>)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of the table (.md, .tex) and figure (.png) (default: the --exp-root)",
    )
    parser.add_argument("--data-root", default=None, help="passed on to train_deepmil.py")
    parser.add_argument(
        "--cudaid",
        default="cpu",
        help="device of the runs, passed on to train_deepmil.py (default: cpu)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run (or reuse) every run, then the report; the report's exit code."""
    args = parse_args(argv)
    root = (args.exp_root or Path("exps/compare") / args.protocol).resolve()
    out = (args.out or root).resolve()
    extra = ["--cudaid", args.cudaid] + (["--data-root", args.data_root] if args.data_root else [])
    began = time.perf_counter()
    folders = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        for setting, config in TRAINED:
            yaml_name = config_name(args.protocol, config)
            folders.append(run_setting(setting, yaml_name, seed, root, extra))
        weights = root / run_name(CLASSIFIER_RUN, seed) / "best_model.pt"
        post_hoc = extra + ["--epoch", "-1", "--path_pre_trained", str(weights)]
        for setting, config in POST_HOC:
            yaml_name = config_name(args.protocol, config)
            folders.append(run_setting(setting, yaml_name, seed, root, post_hoc))
    print(f"all runs: {time.perf_counter() - began:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    name = report_name(args.protocol)
    report = [
        sys.executable,
        "-m",
        "deepmil.report",
        *map(str, folders),
        "--markdown",
        str(out / f"{name}.md"),
        "--latex",
        str(out / f"{name}.tex"),
        "--figure",
        str(out / f"{name}.png"),
        "--curves",
        str(out / f"{name}-curves.png"),
    ]
    return subprocess.run(report, cwd=REPOSITORY, check=False).returncode


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DeepMILError, OSError) as error:
        sys.exit(f"error: {error}")
