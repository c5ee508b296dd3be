"""What reproducing each paper table costs, projected from measured per-step figures.

    python -m deepmil.cost --from exps/gpucheck/gpucheck.json [--crf-from exps/bench.json]
    python -m deepmil.cost --from exps/bench.json

``--from`` is the JSON of ``deepmil.gpucheck`` (float32 rows of its ``step`` and ``eval``
sections) or of ``deepmil.bench`` run on a paper configuration (``step``, ``eval``, and ``crf``
when it ran). For every paper configuration (``glas``, ``cub5``, ``cuball``, ``oxford-flowers``;
no erasing and 4 erasing passes) it multiplies them out with the configuration's epochs, batch
and erasing start and the sizes of the published split: training steps, per-epoch validation,
the final evaluation of the test set and its CRF over ``--crf-workers`` processes. With ``torchrun``
over N GPUs the paper's batch is split (``batch_size / N`` per GPU), so every step runs at that
smaller batch: measured when the JSON has it (``gpucheck``'s per-GPU batches), else divided by N
and marked as ideal. Figures measured on a CPU count machines instead of GPUs. The figures are
projections: only the per-step and per-image times are measured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepmil.config import load_config, resolve_yaml_path
from deepmil.errors import DeepMILError
from deepmil.model import build_model

# Images of split 0 / fold 0 of the published folds: train, valid, test.
SPLIT_SIZES = {
    "glas": (67, 18, 80),
    "cub5": (120, 30, 145),
    "cuball": (4794, 1200, 5794),
    "oxford-flowers": (1020, 1020, 6149),
}
SETTINGS = ("no-erasing", "4-erasing")
# Download sizes in MB (images and masks; download-*.sh), None where not recorded.
DOWNLOAD_MB = {"glas": None, "cub5": 1137 + 37, "cuball": 1137 + 37, "oxford-flowers": 329 + 194}
# Float32 copies of the parameters a run keeps on disk: best_model.pt, and checkpoint.pt with the
# model and SGD's momentum buffers.
PARAMETER_COPIES = 3
EVALUATED_ONCE = ("valid", "test", "train")  # the final evaluation of the selected epoch


class CostError(DeepMILError, ValueError):
    """The measured figures cannot be read."""


@dataclass(frozen=True)
class Measured:
    """Per-step and per-image seconds of the paper setting, on one device."""

    source: str
    unit: str
    batch: int
    plain_s: float
    erasing_s: float
    eval_s: float
    crf_s: float | None
    small_batch_plain_s: dict[int, float]
    small_batch_erasing_s: dict[int, float]
    peak_mb: float | None


def read_json(path: Path) -> dict:
    """A JSON file, or a clear error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CostError(f"{path}: cannot read the measured figures ({error})") from error


def device_unit(report: dict) -> str:
    """What the table counts: ``GPU`` for CUDA figures, ``machine`` for CPU ones."""
    return {"cuda": "GPU", "cpu": "machine"}.get(report.get("device"), "device")


def from_gpucheck(report: dict, path: Path) -> Measured:
    """The float32 figures of a ``deepmil.gpucheck`` report."""
    rows = [row for row in report["step"]["rows"] if row["amp"] == "fp32" and not row["compile"]]
    batch = max(row["batch"] for row in rows)
    full = next(row for row in rows if row["batch"] == batch and not row["channels_last"])
    small = [row for row in rows if row["batch"] < batch and not row["channels_last"]]
    evaluation = next(row for row in report["eval"]["rows"] if row["amp"] == "fp32")
    return Measured(
        source=f"{path} ({report['setting']})",
        unit=device_unit(report),
        batch=batch,
        plain_s=full["step_no_erasing_s"],
        erasing_s=full["step_erasing_s"],
        eval_s=1.0 / evaluation["batch_1_img_s"],
        crf_s=None,
        small_batch_plain_s={row["batch"]: row["step_no_erasing_s"] for row in small},
        small_batch_erasing_s={row["batch"]: row["step_erasing_s"] for row in small},
        peak_mb=full["peak_mb"],
    )


def from_bench(report: dict, path: Path) -> Measured:
    """The figures of a ``deepmil.bench`` report (float32 unless it was run with ``--amp``)."""
    step = report["step"]
    erasing = next(key for key in step if key.endswith("_erasing_s") and key[5].isdigit())
    return Measured(
        source=f"{path} ({report['setting']})",
        unit=device_unit(report),
        batch=int(round(step["consumed_no_erasing_img_s"] * step["step_no_erasing_s"])),
        plain_s=step["step_no_erasing_s"],
        erasing_s=step[erasing],
        eval_s=report["eval"]["eval_forward_s"],
        crf_s=crf_seconds(report),
        small_batch_plain_s={},
        small_batch_erasing_s={},
        peak_mb=step.get("peak_rss_mb", step.get("cuda_peak_mb")),
    )


def crf_seconds(report: dict) -> float | None:
    """Seconds of the CRF of one 480-px image in one process, from a bench report."""
    crf = report.get("crf", {})
    return crf["480_wrapper_ms"] / 1000 if "480_wrapper_ms" in crf else None


def read_measured(path: Path, crf_path: Path | None) -> Measured:
    """The measured figures of ``path`` (a gpucheck or bench JSON), the CRF's from ``crf_path``."""
    report = read_json(path)
    try:
        measured = from_gpucheck(report, path) if "rows" in report.get("step", {}) else None
        measured = measured or from_bench(report, path)
    except (KeyError, StopIteration, TypeError, ValueError) as error:
        raise CostError(f"{path}: no usable step and eval figures ({error!r})") from error
    if crf_path is not None:
        crf = crf_seconds(read_json(crf_path))
        if crf is None:
            raise CostError(f"{crf_path}: no 480-px CRF figure (run deepmil.bench --sections crf)")
        measured = Measured(**{**measured.__dict__, "crf_s": crf})
    return measured


def step_seconds(measured: Measured, gpus: int, erasing: bool) -> tuple[float, bool]:
    """Seconds of one step with the batch split over ``gpus``; whether it was measured."""
    per_gpu = measured.batch // gpus
    table = measured.small_batch_erasing_s if erasing else measured.small_batch_plain_s
    if gpus == 1:
        return (measured.erasing_s if erasing else measured.plain_s), True
    if per_gpu in table:
        return table[per_gpu], True
    return (measured.erasing_s if erasing else measured.plain_s) / gpus, False


def config_cost(
    dataset: str, setting: str, measured: Measured, gpus: int, crf_workers: int
) -> dict[str, Any]:
    """Projected seconds, steps and images of the paper configuration ``dataset-setting``."""
    name = f"{dataset}-{setting}"
    config = load_config(resolve_yaml_path(f"{name}.yaml"))
    train, valid, test = SPLIT_SIZES[dataset]
    epochs, batch = config["max_epochs"], config["batch_size"]
    steps = math.ceil(train / batch)
    erasing_epochs = 0
    if config["nbr_times_erase"] > 0:
        erasing_epochs = max(0, epochs - config["epoch_start_erasing"])
    plain_s, plain_measured = step_seconds(measured, gpus, erasing=False)
    erasing_s, erasing_measured = step_seconds(measured, gpus, erasing=True)
    training = steps * ((epochs - erasing_epochs) * plain_s + erasing_epochs * erasing_s)
    validation = epochs * valid * measured.eval_s / gpus
    final = (valid + test + train) * measured.eval_s / gpus
    crf = None if measured.crf_s is None else test * measured.crf_s / crf_workers
    return {
        "config": name,
        "images": f"{train} / {valid} / {test}",
        "steps": steps * epochs,
        "epoch_s": steps * (erasing_s if erasing_epochs else plain_s)
        + valid * measured.eval_s / gpus,
        "total_s": training + validation + final + (crf or 0.0),
        "final_eval_s": final,
        "crf_s": crf,
        "measured_step": plain_measured and erasing_measured,
    }


def disk_mb(dataset: str, setting: str) -> float | None:
    """Download plus a run's checkpoints, in MB (None when the download size is unknown)."""
    download = DOWNLOAD_MB[dataset]
    if download is None:
        return None
    config = load_config(resolve_yaml_path(f"{dataset}-{setting}.yaml"))
    model = build_model({**config["model"], "pretrained": False})
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return download + PARAMETER_COPIES * parameters * 4 / 1e6


def duration(seconds: float | None) -> str:
    """``42 s``, ``12 min``, ``3.4 h`` or ``2.1 d``; ``–`` for None."""
    if seconds is None:
        return "–"
    for limit, unit, scale in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{seconds / scale:.0f} {unit}" if unit != "h" else f"{seconds / scale:.1f} h"
    return f"{seconds / 86400:.1f} d"


def gigabytes(megabytes: float | None) -> str:
    """``1.7 GB``, or ``–`` for None."""
    return "–" if megabytes is None else f"{megabytes / 1000:.1f} GB"


def cost_table(measured: Measured, gpus: list[int], crf_workers: int) -> str:
    """The Markdown table of every paper configuration."""
    columns = [
        "config",
        "train / valid / test",
        "steps",
        f"epoch (1 {measured.unit})",
        "final eval",
        "CRF of test",
        "disk",
    ]
    columns += [f"total, {count} {measured.unit}{'s' * (count > 1)}" for count in gpus]
    lines = ["| " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * (len(columns) - 2)]
    for dataset in SPLIT_SIZES:
        for setting in SETTINGS:
            one = config_cost(dataset, setting, measured, 1, crf_workers)
            totals = []
            for count in gpus:
                cost = config_cost(dataset, setting, measured, count, crf_workers)
                mark = "" if cost["measured_step"] else " (ideal)"
                totals.append(duration(cost["total_s"]) + mark)
            cells = [
                one["config"],
                one["images"],
                str(one["steps"]),
                duration(one["epoch_s"]),
                duration(one["final_eval_s"]),
                duration(one["crf_s"]),
                gigabytes(disk_mb(dataset, setting)),
                *totals,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, required=True, metavar="JSON")
    parser.add_argument("--crf-from", type=Path, default=None, metavar="BENCH_JSON")
    parser.add_argument("--crf-workers", type=int, default=8, help="CRF processes (default 8)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the cost table."""
    args = parse_args(argv)
    measured = read_measured(args.source, args.crf_from)
    print(f"measured: {measured.source}")
    print(
        f"step at batch {measured.batch}: {measured.plain_s:.3f} s without erasing, "
        f"{measured.erasing_s:.3f} s with 4 erasing passes; evaluation {measured.eval_s:.3f} s "
        f"per image" + ("" if measured.crf_s is None else f"; CRF {measured.crf_s:.3f} s per image")
    )
    if measured.peak_mb is not None:
        print(f"peak memory of the erasing step: {measured.peak_mb / 1024:.1f} GiB")
    print(cost_table(measured, args.gpus, args.crf_workers), end="")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DeepMILError, OSError) as error:
        sys.exit(f"error: {error}")
