"""Speed benchmarks: ``python -m deepmil.bench [--yaml CONFIG --sections step,eval ...]``.

The benchmarked setting is that of a configuration (``--yaml``, by default the synthetic one):
its model section (random weights), batch size, crop size, erasing passes, ``amp``,
``channels_last``, ``compile``, optimizer and CRF parameters; the flags ``--model --classes
--batch --size --kmax --dropout --erase --amp --channels-last --compile`` override it. Prints a
table and writes JSON (one object per section). Each time is the median over ``--repeats`` timed
runs after ``--warmup`` untimed runs. Sections:

* ``step``: training step with and without erasing, against one plain trunk forward+backward on
  the same batch (theory: about 1.5 without erasing), and against the sum of its passes timed
  alone (localizer fwd+bwd, regions fwd+bwd);
* ``eval``: evaluation forward at batch 1 on a ``--size`` image upscaled and padded as the
  evaluation loader does it (the config's ``up_scale_small_dim_to``), against one trunk forward
  on the same image; and per image when ``--batch`` such images are evaluated together
  (``eval_batch_size``);
* ``loader``: images/s that ``loader.make_loader`` delivers over a synthetic training set
  (0/1/2 workers, preload on/off), against the rate the training step consumes them;
* ``crf``: ms per image of ``tools.CRF`` in this process and through ``refine_with_crf`` with a
  process pool, against the bare pydensecrf calls (unary energy precomputed, so that any work
  of the wrapper counts as its overhead).

Every section reports its peak memory: process RSS so far on the CPU (``ru_maxrss``), the
section's ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import crf_params
import loader
from deepmil import files
from deepmil.config import load_config, resolve_yaml_path
from deepmil.crf import CRF, refine_with_crf
from deepmil.engine import erasing_step, plain_step
from deepmil.errors import ConfigError, DeepMILError
from deepmil.geometry import compute_geometry
from deepmil.losses import localizer_loss, negative_loss, positive_loss
from deepmil.methods import build_network
from deepmil.model import MinMaxEntropyNet
from deepmil.optim import build_optimizer
from deepmil.precision import Precision
from deepmil.registry import dataset_spec
from deepmil.synthetic import SyntheticSpec, ensure_synthetic_dataset, read_metadata, render_sample

SECTIONS = ("step", "eval", "loader", "crf")
DEFAULT_CONFIG = "synthetic-no-erasing.yaml"
DEFAULT_ERASING_PASSES = 4


def timed(function: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``function`` in seconds."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# JSON key suffix -> unit, scale and decimals of the printed figure (first match wins).
UNITS = (
    ("_img_s", "images/s", 1.0, 1),
    ("_ms", "ms", 1.0, 2),
    ("_s", "ms", 1000.0, 2),
    ("_mb", "MiB", 1.0, 0),
)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory of the section, or the process's peak RSS so far on the CPU."""
    if device.type == "cuda":
        return {"cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def apply_config(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset from the configuration ``args.yaml``; adds ``config`` (its model
    section updated by the flags; ``--kmax`` sets ``kmin`` too) and ``sigma_erase``."""
    config = load_config(resolve_yaml_path(args.yaml))
    if config["method"] != "minmax":
        raise ConfigError(
            f"{args.yaml}: method = {config['method']!r}; the benchmark measures "
            f"the min-max entropy model (method: minmax)"
        )
    model = config["model"]
    crop_height, crop_width = config["crop_size"]
    if args.size is None and crop_height != crop_width:
        raise ConfigError(
            f"{args.yaml}: crop_size = {config['crop_size']} is not square; give "
            f"the benchmark's image side with --size"
        )
    kmin = model["kmin"] if args.kmax is None else args.kmax
    erasing_passes = config["nbr_times_erase"] or DEFAULT_ERASING_PASSES
    for flag, value in (
        ("model", model["name"]),
        ("classes", model["num_classes"]),
        ("batch", config["batch_size"]),
        ("size", crop_height),
        ("kmax", model["kmax"]),
        ("dropout", model["dropout"]),
        ("erase", erasing_passes),
        ("amp", config["amp"]),
        ("channels_last", config["channels_last"]),
        ("compile", config["compile"]),
    ):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    config["model"] = {
        **model,
        "name": args.model,
        "num_classes": args.classes,
        "kmax": args.kmax,
        "kmin": kmin,
        "dropout": args.dropout,
        "pretrained": False,
    }
    config.update(
        MYSEED=0,
        path_pre_trained=None,
        batch_size=args.batch,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    args.config, args.sigma_erase = config, float(config["sigma_erase"])
    return args


def build_net(args: argparse.Namespace, device: torch.device) -> MinMaxEntropyNet:
    """The benchmarked model on ``device`` (random weights, seed 0), built as a training run
    builds it (channels-last and compiled if asked)."""
    return build_network(args.config, device)


def random_images(
    args: argparse.Namespace, batch: int, size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Random ``batch x 3 x h x w`` images, channels-last if asked."""
    images = torch.randn(batch, 3, *size, device=device)
    return images.contiguous(memory_format=torch.channels_last) if args.channels_last else images


def bench_step(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Trunk fwd+bwd, the passes of a step alone, a plain step and an erasing step.

    The labels are the localizer's own predictions on the batch, so that samples stay trusted
    and erasing runs as many of its passes as it can (``erasing_passes_run``).
    """
    model = build_net(args, device).train()
    precision = Precision.build(args.amp, device, args.channels_last)
    optimizer = build_optimizer(model, args.config["optimizer"])
    images = random_images(args, args.batch, (args.size, args.size), device)
    with torch.no_grad():
        labels = model(images, mode="segment")[1].argmax(dim=1)
    mask = torch.rand_like(images[:, :1])

    def trunk() -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            features = model.trunk(images)
        features.float().sum().backward()

    def localizer() -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            scores = model(images, mode="segment")[1]
        localizer_loss(scores.float(), labels).backward()

    def regions() -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            pos_scores, _, neg_scores, _ = model(images, mask=mask, mode="regions")
        (positive_loss(pos_scores.float(), labels) + negative_loss(neg_scores.float())).backward()

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        plain_step(model, images, labels, seed=0, precision=precision)
        precision.step(optimizer)

    passes = []

    def erasing() -> None:
        optimizer.zero_grad(set_to_none=True)
        stats = erasing_step(
            model,
            images,
            labels,
            seed=0,
            nbr_times_erase=args.erase,
            sigma_erase=args.sigma_erase,
            precision=precision,
        )
        precision.step(optimizer)
        passes.append(int(stats["erasing_passes"]))

    erasing_name = f"step_{args.erase}_erasing_s"
    results = {
        name: timed(function, device, args.warmup, args.repeats)
        for name, function in (
            ("trunk_fwd_bwd_s", trunk),
            ("localizer_fwd_bwd_s", localizer),
            ("regions_fwd_bwd_s", regions),
            ("step_no_erasing_s", plain),
            (erasing_name, erasing),
        )
    }
    results["erasing_passes_run"] = statistics.median_low(passes)
    results["ratio_no_erasing"] = results["step_no_erasing_s"] / results["trunk_fwd_bwd_s"]
    results[f"ratio_{args.erase}_erasing"] = results[erasing_name] / results["trunk_fwd_bwd_s"]
    passes_sum = results["localizer_fwd_bwd_s"] + results["regions_fwd_bwd_s"]
    results["ratio_no_erasing_vs_passes"] = results["step_no_erasing_s"] / passes_sum
    erasing_sum = (
        results["erasing_passes_run"] * results["localizer_fwd_bwd_s"]
        + results["regions_fwd_bwd_s"]
    )
    results["ratio_erasing_vs_passes"] = results[erasing_name] / erasing_sum
    results["consumed_no_erasing_img_s"] = args.batch / results["step_no_erasing_s"]
    results["consumed_erasing_img_s"] = args.batch / results[erasing_name]
    return results


def bench_eval(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Default forward (eval mode, no grad, batch 1) against one trunk forward."""
    model = build_net(args, device).eval()
    precision = Precision.build(args.amp, device, args.channels_last)
    padded = compute_geometry(args.size, args.size, args.config["up_scale_small_dim_to"]).padded
    image = random_images(args, 1, padded, device)

    batch = random_images(args, args.batch, padded, device)

    @torch.no_grad()
    def forward() -> None:
        with precision.autocast():
            model(image, mask_normalization="sample")

    @torch.no_grad()
    def batched() -> None:
        with precision.autocast():
            model(batch, mask_normalization="sample", fused_regions=True)

    @torch.no_grad()
    def trunk() -> None:
        with precision.autocast():
            model.trunk(image)

    results = {
        "padded_height": padded[0],
        "padded_width": padded[1],
        "eval_forward_s": timed(forward, device, args.warmup, args.repeats),
        "trunk_forward_s": timed(trunk, device, args.warmup, args.repeats),
        "batched_eval_forward_s": timed(batched, device, args.warmup, args.repeats),
    }
    results["eval_img_s"] = 1.0 / results["eval_forward_s"]
    results["ratio_eval_vs_trunk"] = results["eval_forward_s"] / results["trunk_forward_s"]
    per_image = results["batched_eval_forward_s"] / args.batch
    results["batched_eval_img_s"] = 1.0 / per_image
    results["ratio_batched_eval_per_image_vs_trunk"] = per_image / results["trunk_forward_s"]
    return results


def loader_rate(
    dataset: loader.PhotoDataset,
    batch: int,
    workers: int,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> float:
    """Images/s of whole training epochs (workers started each epoch, as in training)."""
    data = loader.make_loader(dataset, batch, workers, shuffle=True, seed=0)
    epoch = iter(range(warmup + repeats))

    def one_epoch() -> None:
        loader.set_loader_epoch(data, next(epoch))
        for _ in data:
            pass

    return len(dataset) / timed(one_epoch, device, warmup, repeats)


def bench_loader(
    args: argparse.Namespace, device: torch.device, consumed: float | None
) -> dict[str, float]:
    """Training-loader images/s per worker count and preload setting (synthetic images)."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "synthetic"
        ensure_synthetic_dataset(
            root, SyntheticSpec(image_size=args.size, n_train=args.loader_images, n_test=4)
        )
        rows = [
            loader.FoldRow(row["image"], row["mask"], row["class"])
            for row in read_metadata(root)
            if row["set"] == "train"
        ]
        encoding = {name: index for index, name in enumerate(sorted({row.label for row in rows}))}
        for preload in (False, True):
            dataset = loader.PhotoDataset(
                rows,
                root,
                encoding,
                dataset_spec("synthetic"),
                train=True,
                crop_size=args.size,
                padding_size=(0.5, 0.5),
                preload=preload,
            )
            results["images"] = len(dataset)  # the same training images for both settings
            for workers in args.loader_workers:
                name = f"workers_{workers}_preload_{'on' if preload else 'off'}_img_s"
                results[name] = loader_rate(
                    dataset, args.batch, workers, device, args.warmup, args.repeats
                )
    if consumed is not None:
        results["training_consumes_img_s"] = consumed
        most = max(args.loader_workers)
        for preload in ("off", "on"):
            results[f"ratio_workers_{most}_preload_{preload}_vs_training"] = (
                results[f"workers_{most}_preload_{preload}_img_s"] / consumed
            )
    return results


def crf_inputs(size: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Synthetic images with a soft version of their ground-truth mask."""
    spec = SyntheticSpec(image_size=size)
    samples = [render_sample(spec, "test", index) for index in range(count)]
    return [(sample.image, 0.2 + 0.6 * sample.mask.astype(np.float64)) for sample in samples]


def unary_energy(foreground: np.ndarray) -> np.ndarray:
    """``-log p`` of background / foreground as pydensecrf takes it (``2 x HW`` float32)."""
    probabilities = np.clip(np.stack([1 - foreground, foreground]), 1e-8, 1.0)
    return np.ascontiguousarray(-np.log(probabilities).reshape(2, -1), dtype=np.float32)


def raw_densecrf(
    image: np.ndarray,
    unary: np.ndarray,
    params: crf_params.CRFParams,
    gaussian_compat: int,
    bilateral_compat: int,
) -> np.ndarray:
    """The bare pydensecrf calls of ``tools.CRF`` (same parameters; no checks, no unary)."""
    from pydensecrf import densecrf

    height, width = image.shape[:2]
    model = densecrf.DenseCRF2D(width, height, 2)
    model.setUnaryEnergy(unary)
    model.addPairwiseGaussian(
        sxy=params.sxy_gaussian,
        compat=gaussian_compat,
        kernel=densecrf.DIAG_KERNEL,
        normalization=densecrf.NORMALIZE_SYMMETRIC,
    )
    model.addPairwiseBilateral(
        sxy=params.sxy_bilateral,
        srgb=params.srgb_bilateral,
        rgbim=np.array(image, order="C"),
        compat=bilateral_compat,
        kernel=densecrf.DIAG_KERNEL,
        normalization=densecrf.NORMALIZE_SYMMETRIC,
    )
    return np.asarray(model.inference(params.n_iter), dtype=np.float32)


def bench_crf(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """ms per image: raw pydensecrf, ``tools.CRF`` and ``refine_with_crf`` with a pool (the CRF
    parameters of the config's dataset)."""
    crf = CRF(crf_params.params_for(args.config["dataset"]))
    results = {}
    for size in args.crf_sizes:
        inputs = crf_inputs(size, args.crf_images)
        keyed = [(index, image, mask) for index, (image, mask) in enumerate(inputs)]
        unaries = [(image, unary_energy(mask)) for image, mask in inputs]

        def raw() -> None:
            for image, unary in unaries:
                raw_densecrf(image, unary, crf.params, crf.GAUSSIAN_COMPAT, crf.BILATERAL_COMPAT)

        def wrapper() -> None:
            for image, mask in inputs:
                crf(image, mask)

        def pool() -> None:
            list(refine_with_crf(crf, keyed, workers=args.crf_workers))

        per_image = 1000.0 / len(inputs)
        raw_ms = per_image * timed(raw, device, args.warmup, args.repeats)
        wrapper_ms = per_image * timed(wrapper, device, args.warmup, args.repeats)
        pool_ms = per_image * timed(pool, device, args.warmup, args.repeats)
        results.update(
            {
                f"{size}_raw_ms": raw_ms,
                f"{size}_wrapper_ms": wrapper_ms,
                f"{size}_pool_{args.crf_workers}_ms": pool_ms,
                f"{size}_ratio_wrapper_vs_raw": wrapper_ms / raw_ms,
                f"{size}_pool_speedup": wrapper_ms / pool_ms,
            }
        )
    return results


def int_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``, for argparse."""
    return [int(item) for item in text.split(",")]


def section_list(text: str) -> list[str]:
    """Comma-separated section names, checked, for argparse."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown sections {unknown}; expected some of {','.join(SECTIONS)}"
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        type=section_list,
        default=list(SECTIONS),
        help=f"comma list of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--yaml",
        default=DEFAULT_CONFIG,
        help=f"configuration whose setting is benchmarked (default: "
        f"{DEFAULT_CONFIG}); the flags below override it",
    )
    parser.add_argument("--model", default=None, help="model.name")
    parser.add_argument("--classes", type=int, default=None, help="model.num_classes")
    parser.add_argument("--batch", type=int, default=None, help="batch_size")
    parser.add_argument("--size", type=int, default=None, help="image side (crop_size)")
    parser.add_argument("--kmax", type=float, default=None, help="model.kmax and model.kmin")
    parser.add_argument("--dropout", type=float, default=None, help="model.dropout")
    parser.add_argument(
        "--erase",
        type=int,
        default=None,
        help=f"erasing passes of the erasing step (nbr_times_erase, or "
        f"{DEFAULT_ERASING_PASSES} when it is 0)",
    )
    parser.add_argument(
        "--amp",
        choices=("bf16", "fp16"),
        default=None,
        help="autocast dtype of the step and eval sections",
    )
    parser.add_argument(
        "--channels-last",
        action="store_const",
        const=True,
        default=None,
        help="model and images in channels-last memory format",
    )
    parser.add_argument(
        "--compile",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model with this backend (e.g. inductor)",
    )
    parser.add_argument(
        "--loader-images",
        type=int,
        default=120,
        help="synthetic training images generated for the loader section",
    )
    parser.add_argument("--loader-workers", type=int_list, default=[0, 1, 2])
    parser.add_argument("--crf-sizes", type=int_list, default=[480, 128])
    parser.add_argument("--crf-images", type=int, default=8, help="images per CRF size")
    parser.add_argument("--crf-workers", type=int, default=2, help="processes of the CRF pool")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("exps/bench.json"))
    return parser.parse_args(argv)


def run_sections(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Run the selected sections in a fixed order; each gets its peak memory."""
    results = {}
    for name in SECTIONS:
        if name not in args.sections:
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if name == "step":
            results[name] = bench_step(args, device)
        elif name == "eval":
            results[name] = bench_eval(args, device)
        elif name == "loader":
            consumed = results.get("step", {}).get("consumed_no_erasing_img_s")
            results[name] = bench_loader(args, device, consumed)
        else:
            results[name] = bench_crf(args, device)
        results[name].update(peak_memory_mb(device))
    return results


def main(argv: list[str] | None = None) -> dict:
    args = apply_config(parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setting = (
        f"{args.yaml}: {args.model}, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.device}, "
        f"{torch.get_num_threads()} threads, amp {args.amp}, "
        f"channels_last {args.channels_last}, compile {args.compile}"
    )
    results = run_sections(args, device)
    print(setting)
    for section, values in results.items():
        print(section)
        for name, value in values.items():
            label, shown = readable(name, value)
            print(f"  {label:<48} {shown}")
    report = {"setting": setting, "device": device.type, **results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(report, args.json)
    print(f"figures (seconds, images/s, MiB, ratios) written to {args.json}")
    return report


def readable(key: str, value: float) -> tuple[str, str]:
    """A figure's label and value with its unit, from its JSON key: ``*_s`` in ms, ``*_ms``,
    ``*_img_s`` in images/s, ``*_mb`` in MiB, ratios and speed-ups with ``x``; counts bare."""
    words = key.replace("fwd_bwd", "forward+backward")
    for suffix, unit, scale, digits in UNITS:
        if words.endswith(suffix):
            label = words.removesuffix(suffix).replace("_", " ")
            return label, f"{value * scale:12.{digits}f} {unit}"
    if "ratio" in words or "speedup" in words:
        return words.replace("_", " "), f"{value:12.2f} x"
    return words.replace("_", " "), f"{value:12g}"


if __name__ == "__main__":
    try:
        main()
    except (DeepMILError, OSError) as error:
        sys.exit(f"error: {error}")
