"""The prepared GPU check: one call that measures and checks the GPU path, then reports.

    python -m deepmil.gpucheck [--device cuda] [--out exps/gpucheck]

Made for one call of at most about 8 minutes on a machine with one GPU. It writes
``gpucheck.json`` and ``gpucheck.md`` to ``--out`` and exits with 1, naming every failed check,
if anything raised or a check did not hold (the other checks still run). Sections, in order:

* ``determinism``: one training step of every method (min-max plain and with erasing, CAM,
  WILDCAT) and the Grad-CAM evaluation, under ``torch.use_deterministic_algorithms(True,
  warn_only=True)`` as training runs them; lists every warning torch gives (ops without a
  deterministic implementation on the device). First, so that warnings torch gives once per
  process are seen;
* ``step``: the paper's setting (``--yaml``, by default ``glas-4-erasing.yaml``: ResNet-101,
  batch 8, 480 px; random images) timed by ``deepmil.bench``: the step without and with 4
  erasing passes in float32, bfloat16 and float16 (with its gradient scaler), each without and
  with channels-last, then ``torch.compile`` of the fastest, then float32 at the per-GPU
  batches of ``torchrun`` over 2 and 4 GPUs (4, 2); images/s and peak allocated memory;
* ``eval``: evaluation images/s at batch 1 on an odd-sized image (padded as the evaluation loader
  pads it) and batched, in float32 and with the fastest step's autocast;
* ``train``: ``--epochs`` of synthetic training (``--train-yaml``) from one seed, twice in float32
  and once in bfloat16, the three runs side by side; the two float32 runs must give identical
  metrics, and bfloat16 must stay within ``--tolerance`` points (default 5) of float32 on the
  test set's classification error, F1+ and F1-;
* ``ddp``: ``torchrun`` with two processes when there are two devices (two GPUs, or the CPU);
  on a single GPU NCCL refuses two processes on one device, so one process joins a process group
  of one, converts BatchNorm to SyncBN, wraps the model in ``DistributedDataParallel`` and
  checks that its gradients, plain and with erasing, equal those of the unwrapped model;
* ``loader``: training images/s that the loader delivers at the step's size per worker count,
  against what the fastest step consumes, and the worker count that implies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import loader
import reproducibility
import tools
from create_folds import ensure_synthetic_folds
from deepmil import bench, files
from deepmil.errors import DeepMILError
from deepmil.experiment import REPOSITORY
from deepmil.methods import Erasing, build_network, get_method
from deepmil.precision import Precision
from deepmil.synthetic import SyntheticSpec

SECTIONS = ("determinism", "step", "eval", "train", "ddp", "loader")
PAPER_CONFIG = "glas-4-erasing.yaml"
TRAIN_CONFIG = "synthetic-no-erasing.yaml"
# bfloat16 against float32 after the same training: largest difference allowed by default, in
# points (%), of the test classification error, F1+ and F1- (100 test images: one image is 1 point).
TOLERANCE = 5.0
COMPARED = ("cl_error", "f1_pos", "f1_neg")
ERASING_PASSES = 4
DETERMINISTIC_METHODS = ("minmax", "cam", "wildcat", "gradcam")
LOADER_EPOCHS = 2  # timed loader epochs per setting (the median is reported)


class CheckFailed(DeepMILError, AssertionError):
    """A check of the GPU path did not hold."""


def precisions(device: torch.device) -> list[str | None]:
    """Autocast settings timed on ``device``: float32, bfloat16, float16 on CUDA; float32 on
    the CPU (float16 autocast is CUDA-only, bfloat16 is emulated on many CPUs)."""
    return [None, "bf16", "fp16"] if device.type == "cuda" else [None]


def bench_options(args: argparse.Namespace, **flags: Any) -> argparse.Namespace:
    """``deepmil.bench``'s settings for the paper's configuration, with ``flags`` added."""
    options = ["--yaml", args.yaml, "--device", args.device]
    options += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    options += ["--erase", str(ERASING_PASSES)]
    for name, value in (("model", args.model), ("batch", args.batch), ("size", args.size)):
        if value is not None:
            options += [f"--{name}", str(value)]
    for name, value in flags.items():
        if value is True:
            options.append(f"--{name.replace('_', '-')}")
        elif value not in (None, False):
            options += [f"--{name.replace('_', '-')}", str(value)]
    return bench.apply_config(bench.parse_args(options))


def peak_mb(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since the last reset, in MiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory measurement."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def step_row(
    args: argparse.Namespace,
    device: torch.device,
    amp: str | None,
    channels_last: bool,
    backend: str | None = None,
    batch: int | None = None,
) -> dict[str, Any]:
    """One timed setting of the training step (at ``batch`` instead of the config's if given)."""
    options = bench_options(
        args, amp=amp, channels_last=channels_last, compile=backend, batch=batch
    )
    reset_peak(device)
    began = time.perf_counter()
    timings = bench.bench_step(options, device)
    erasing_key = f"step_{ERASING_PASSES}_erasing_s"
    return {
        "amp": amp or "fp32",
        "batch": options.batch,
        "channels_last": channels_last,
        "compile": backend,
        "step_no_erasing_s": timings["step_no_erasing_s"],
        "step_erasing_s": timings[erasing_key],
        "erasing_passes_run": timings["erasing_passes_run"],
        "no_erasing_img_s": timings["consumed_no_erasing_img_s"],
        "erasing_img_s": timings["consumed_erasing_img_s"],
        "trunk_fwd_bwd_s": timings["trunk_fwd_bwd_s"],
        "peak_mb": peak_mb(device),
        "section_s": time.perf_counter() - began,
    }


def fastest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The uncompiled row of the shortest step without erasing at the config's batch."""
    full = max(row["batch"] for row in rows)
    timed = [row for row in rows if not row["compile"] and row["batch"] == full]
    return min(timed, key=lambda row: row["step_no_erasing_s"])


def check_step(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Step times of every precision and memory format, then compiled for the fastest."""
    rows = [
        step_row(args, device, amp, channels_last)
        for amp in precisions(device)
        for channels_last in (False, True)
    ]
    best = fastest(rows)
    amp = None if best["amp"] == "fp32" else best["amp"]
    rows.append(step_row(args, device, amp, best["channels_last"], args.compile_backend))
    rows += [step_row(args, device, None, False, batch=batch) for batch in args.small_batches]
    return {"rows": rows, "fastest": {key: best[key] for key in ("amp", "channels_last")}}


def check_eval(args: argparse.Namespace, device: torch.device, fast: dict) -> dict[str, Any]:
    """Evaluation images/s at batch 1 (odd size, padded) and batched, fp32 and fastest amp."""
    rows = []
    amps = dict.fromkeys([None, None if fast["amp"] == "fp32" else fast["amp"]])
    for amp in amps:
        options = bench_options(args, amp=amp, channels_last=fast["channels_last"])
        options.size = args.eval_size
        reset_peak(device)
        timings = bench.bench_eval(options, device)
        rows.append(
            {
                "amp": amp or "fp32",
                "image": f"{args.eval_size}x{args.eval_size}",
                "padded": f"{timings['padded_height']}x{timings['padded_width']}",
                "batch_1_img_s": timings["eval_img_s"],
                f"batch_{options.batch}_img_s": timings["batched_eval_img_s"],
                "peak_mb": peak_mb(device),
            }
        )
    return {"rows": rows}


def method_config(args: argparse.Namespace, method: str) -> dict:
    """The benchmarked configuration (random weights) with ``method`` and batch 2."""
    config = bench_options(args).config
    return {**config, "method": method, "batch_size": 2}


def determinism_step(method: str, config: dict, device: torch.device) -> None:
    """One training step of ``method`` (min-max: plain, then with erasing), or for Grad-CAM
    the evaluation outputs, on a random batch of two images."""
    network = build_network(config, device)
    size = config["crop_size"]
    images = torch.randn(2, 3, *size, device=device)
    labels = torch.arange(2, device=device) % config["model"]["num_classes"]
    runner = get_method(method)
    if method == "gradcam":
        network.eval()
        runner.outputs(network, images, labels, batched=True)
        return
    network.train()
    precision = Precision.build(None, device)
    runner.train_step(network, images, labels, 0, precision, None)
    if method == "minmax":
        erasing = Erasing(passes=ERASING_PASSES)
        runner.train_step(network, images, labels, 0, precision, erasing)


def check_determinism(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Warnings of ``use_deterministic_algorithms`` for every method's step, by method."""
    reproducibility.set_deterministic(warn_only=True)
    found = {}
    for method in DETERMINISTIC_METHODS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            determinism_step(method, method_config(args, method), device)
        found[method] = sorted({str(warning.message).splitlines()[0] for warning in caught})
    return {"warnings": found}


def train_argv(args: argparse.Namespace, name: str, amp: str | None) -> list[str]:
    """``train_deepmil.py`` arguments of one run of the training check."""
    argv = ["--yaml", args.train_yaml, "--cudaid", args.cudaid, "--epoch", str(args.epochs)]
    argv += ["--data-root", str(args.out / "data"), "--exp-root", str(args.out / "train")]
    argv += ["--exp-name", name, "--overwrite", "--quiet", "--set", f"amp={amp or 'null'}"]
    for change in args.train_set:
        argv += ["--set", change]
    return argv


def prepare_synthetic(argv: list[str]) -> None:
    """Generate the synthetic data of a run beforehand, so that the runs can start together."""
    config, _ = tools.get_yaml_args(argv)
    if config["dataset"] == "synthetic":
        data = loader.DataConfig.from_config(config)
        spec = SyntheticSpec.from_config(config["synthetic"])
        ensure_synthetic_folds(data.data_root, data.fold_folder, spec, data.folds_name)


def run_in_parallel(commands: dict[str, list[str]], logs: Path) -> dict[str, float]:
    """Run the commands side by side; seconds each took; raises if one failed."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "MYSEED"}
    began = time.perf_counter()
    running = {}
    for name, command in commands.items():
        log = open(logs / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
        process = subprocess.Popen(
            command, cwd=REPOSITORY, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        running[name] = (process, log)
    seconds, failed = {}, []
    for name, (process, log) in running.items():
        process.wait()
        log.close()
        seconds[name] = time.perf_counter() - began
        if process.returncode != 0:
            failed.append(f"{name} (exit {process.returncode}, see {logs / (name + '.log')})")
    if failed:
        raise CheckFailed(f"runs failed: {', '.join(failed)}")
    return seconds


def deterministic_warnings(log: Path) -> list[str]:
    """Lines of a run's log that report an op without a deterministic implementation."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    return sorted({line.strip() for line in lines if "deterministic" in line})


def check_train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Two float32 runs and one bfloat16 run of the same seed, compared on the test set."""
    runs = {"fp32-a": None, "fp32-b": None, "bf16": "bf16"}
    commands = {
        name: [sys.executable, "train_deepmil.py", *train_argv(args, name, amp)]
        for name, amp in runs.items()
    }
    prepare_synthetic(train_argv(args, "fp32-a", None))
    seconds = run_in_parallel(commands, args.out / "train" / "logs")
    metrics = {
        name: json.loads((args.out / "train" / name / "final_metrics.json").read_text())["test"]
        for name in runs
    }
    differences = {key: abs(metrics["bf16"][key] - metrics["fp32-a"][key]) for key in COMPARED}
    result = {
        "seconds": seconds,
        "test": {name: {key: metrics[name][key] for key in COMPARED} for name in runs},
        "fp32_runs_identical": metrics["fp32-a"] == metrics["fp32-b"],
        "bf16_vs_fp32": differences,
        "tolerance": args.tolerance,
        "run_warnings": {
            name: deterministic_warnings(args.out / "train" / "logs" / f"{name}.log")
            for name in runs
        },
    }
    problems = [
        f"bf16 {key} differs by {value:.2f} points"
        for key, value in differences.items()
        if value > args.tolerance
    ]
    if not result["fp32_runs_identical"]:
        problems.append("the two float32 runs differ")
    if problems:
        raise CheckFailed(f"training check: {', '.join(problems)}; {json.dumps(result)}")
    return result


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of the parameters' gradients (zeros where a parameter has none)."""
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for p in model.parameters()
    ]


def largest_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """Largest absolute difference between two lists of tensors."""
    return max(float((a - b).abs().max()) for a, b in zip(first, second))


def synced_gradients(config: dict, device: torch.device, erasing: Erasing | None) -> float:
    """Largest gradient difference between the model and its SyncBN + DDP wrapping (one
    process) after the same step."""
    from torch.nn.parallel import DistributedDataParallel

    images = torch.randn(2, 3, *config["crop_size"], device=device)
    labels = torch.arange(2, device=device) % config["model"]["num_classes"]
    runner, precision = get_method("minmax"), Precision.build(None, device)
    plain = build_network(config, device).train()
    runner.train_step(plain, images, labels, 0, precision, erasing)
    wrapped_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_network(config, device))
    wrapped = DistributedDataParallel(
        wrapped_model.train(), device_ids=[device.index or 0], forward_sync_buffers=False
    )
    runner.train_step(wrapped, images, labels, 0, precision, erasing)
    return largest_difference(gradients(plain), gradients(wrapped_model))


def one_gpu_ddp(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """SyncBN + DDP in a process group of one on the GPU, against the unwrapped model."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        config = method_config(args, "minmax")
        result = {
            "mode": "one process, SyncBN + DDP (NCCL refuses two processes on one GPU)",
            "plain_step_max_grad_difference": synced_gradients(config, device, None),
            "erasing_step_max_grad_difference": synced_gradients(
                config, device, Erasing(passes=ERASING_PASSES)
            ),
        }
    finally:
        dist.destroy_process_group()
    bad = [key for key, value in result.items() if key != "mode" and value > 1e-5]
    if bad:
        raise CheckFailed(f"DDP check: {', '.join(bad)} above 1e-5: {result}")
    return result


def two_process_ddp(args: argparse.Namespace) -> dict[str, Any]:
    """``torchrun`` with two processes for one epoch of the training check's setting."""
    argv = train_argv(args, "ddp", None)
    argv[argv.index("--epoch") + 1] = "1"
    prepare_synthetic(argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "train_deepmil.py", *argv]
    seconds = run_in_parallel({"ddp": command}, args.out / "train" / "logs")
    metrics = json.loads((args.out / "train" / "ddp" / "final_metrics.json").read_text())
    return {
        "mode": "torchrun, 2 processes",
        "seconds": seconds["ddp"],
        "test": {key: metrics["test"][key] for key in COMPARED},
    }


def check_ddp(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Two processes where there are two devices, else one process with SyncBN and DDP."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return one_gpu_ddp(args, device)
    return two_process_ddp(args)


def check_loader(args: argparse.Namespace, device: torch.device, consumed: float) -> dict:
    """Loader images/s per worker count at the step's size, and the workers the step needs."""
    options = bench_options(args)
    options.loader_workers = [count for count in args.loader_workers if count <= os.cpu_count()]
    options.warmup, options.repeats = 0, LOADER_EPOCHS
    rates = bench.bench_loader(options, torch.device("cpu"), None)
    workers = min(count for count in options.loader_workers if count > 0)
    per_worker = rates[f"workers_{workers}_preload_off_img_s"] / workers
    return {
        "images_s": {key: value for key, value in rates.items() if key.endswith("_img_s")},
        "step_consumes_img_s": consumed,
        "images_s_per_worker": per_worker,
        "workers_needed": math.ceil(consumed / per_worker),
        "cpu_count": os.cpu_count(),
        "config_workers": options.config["num_workers"],
    }


def run_section(
    name: str, function: Callable[[], dict], report: dict, failures: list[str]
) -> dict | None:
    """Run one section; its result, or its error recorded in ``report`` and ``failures``."""
    print(f"{name} ...", flush=True)
    began = time.perf_counter()
    try:
        result = function()
    except Exception as error:  # noqa: BLE001 (every failure is reported, then exit 1)
        report[name] = {
            "error": f"{type(error).__name__}: {error}",
            "trace": traceback.format_exc(),
        }
        failures.append(f"{name}: {type(error).__name__}: {error}")
        print(f"{name} FAILED: {error}", flush=True)
        return None
    result["seconds_total"] = time.perf_counter() - began
    report[name] = result
    print(f"{name}: {result['seconds_total']:.0f} s", flush=True)
    return result


def run_checks(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Every selected section in order; the report and the failures."""
    device = torch.device(args.device)
    report: dict[str, Any] = {"setting": setting_text(args, device), "device": device.type}
    failures: list[str] = []
    sections = set(args.sections)
    fast = {"amp": "fp32", "channels_last": False}
    consumed = None
    if "determinism" in sections:
        run_section("determinism", lambda: check_determinism(args, device), report, failures)
    if "step" in sections:
        step = run_section("step", lambda: check_step(args, device), report, failures)
        if step:
            fast = step["fastest"]
            consumed = max(row["no_erasing_img_s"] for row in step["rows"])
    if "eval" in sections:
        run_section("eval", lambda: check_eval(args, device, fast), report, failures)
    if "train" in sections:
        run_section("train", lambda: check_train(args, device), report, failures)
    if "ddp" in sections:
        run_section("ddp", lambda: check_ddp(args, device), report, failures)
    if "loader" in sections:
        rate = consumed or 0.0
        run_section("loader", lambda: check_loader(args, device, rate), report, failures)
    return report, failures


def setting_text(args: argparse.Namespace, device: torch.device) -> str:
    """The device, versions and benchmarked setting, in one line."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (
        f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"{os.cpu_count()} CPUs; {args.yaml}"
        + "".join(
            f", {key} {value}"
            for key, value in (("model", args.model), ("batch", args.batch), ("size", args.size))
            if value is not None
        )
    )


def cell(value: Any) -> str:
    """A table cell: floats with two decimals, ``–`` for None."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    """Markdown table lines of ``rows``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in columns) + " |" for row in rows]
    return lines


def markdown(report: dict[str, Any], failures: list[str]) -> str:
    """The report as Markdown: one table or list per section, failures first."""
    lines = ["# GPU check", "", report["setting"], ""]
    if failures:
        lines += ["## Failed", "", *[f"- {failure}" for failure in failures], ""]
    for name in SECTIONS:
        result = report.get(name)
        if not result or "error" in result:
            continue
        lines += [f"## {name} ({result['seconds_total']:.0f} s)", ""]
        if "rows" in result:
            lines += table(result["rows"], list(result["rows"][0]))
        else:
            shown = {key: value for key, value in result.items() if key != "seconds_total"}
            lines += ["```json", json.dumps(shown, indent=2, sort_keys=True), "```"]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The check's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--out", type=Path, default=Path("exps/gpucheck"))
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="default: all"
    )
    parser.add_argument("--yaml", default=PAPER_CONFIG, help="the timed setting's config")
    parser.add_argument("--model", default=None, help="model.name of the timed setting")
    parser.add_argument("--batch", type=int, default=None, help="batch of the timed setting")
    parser.add_argument("--size", type=int, default=None, help="image side of the timed setting")
    parser.add_argument("--eval-size", type=int, default=479, help="odd image side for eval")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--small-batches",
        type=bench.int_list,
        default=[2, 4],
        help="per-GPU batches of the paper's 8 over 4 and 2 GPUs, timed in float32",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-yaml", default=TRAIN_CONFIG)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help=f"largest bf16-fp32 difference of test error, F1+, F1- in points (default {TOLERANCE:g})",
    )
    parser.add_argument(
        "--train-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="--set overrides of the training runs",
    )
    parser.add_argument("--loader-workers", type=bench.int_list, default=[0, 1, 2, 4, 8])
    args = parser.parse_args(argv)
    args.cudaid = "cpu" if args.device == "cpu" else (args.device.partition(":")[2] or "0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the checks, write the JSON and Markdown reports; 1 if anything failed."""
    args = parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
        return 1
    shutil.rmtree(args.out / "train", ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report, failures = run_checks(args)
    report["failures"] = failures
    files.write_json(report, args.out / "gpucheck.json")
    files.write_text(markdown(report, failures), args.out / "gpucheck.md")
    print(markdown(report, failures))
    print(f"written: {args.out / 'gpucheck.json'}, {args.out / 'gpucheck.md'}")
    if failures:
        print(f"FAILED: {len(failures)} check(s): " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
