"""Train and evaluate the min-max entropy model.

    python train_deepmil.py --yaml synthetic-4-erasing.yaml [--cudaid cpu] [overrides]

Reads ``config_yaml/<name>``, applies the command-line overrides, trains with recursive erasing,
selects the epoch with the lowest validation classification error and evaluates it on the
validation, test and training sets. Everything is written to one experiment folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import crf_params
import loader
import reproducibility
from create_folds import synthetic_folds_held
from deepmil import checkpoint, distributed, experiment, files, plots
from deepmil.config import save_config
from deepmil.distributed import DistributedContext, select_device
from deepmil.engine import Evaluation, evaluate, train_one_epoch, unwrap
from deepmil.errors import ConfigError, DeepMILError, RunError
from deepmil.methods import build_network
from deepmil.metrics import best_threshold_report
from deepmil.optim import build_optimizer, learning_rate, set_learning_rate
from deepmil.predict import network_config, write_class_names
from deepmil.pretrain import pretrained_trunk_record
from deepmil.scoremaps import scoremap_path, scoremap_writer
from deepmil.settings import RunSettings
from deepmil.synthetic import SyntheticSpec
from tools import CRF, get_yaml_args

LOGGER = logging.getLogger("train_deepmil")
PANEL_IMAGES = 6
PANEL_MISCLASSIFIED = 3
PANEL_WORST = 3
HISTOGRAM_BINS = 50
# The evaluated sets by loader name (``train_eval``: the training set with evaluation
# transforms) and the split each one reads.
EVALUATED_SPLITS = {"valid": "valid", "test": "test", "train_eval": "train"}
EVALUATED = tuple(EVALUATED_SPLITS)


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGINT / SIGTERM handler to stop between training steps.

    A ``KeyboardInterrupt``, so that no ``except Exception`` swallows it and data-loader workers
    (which inherit the handler) stop quietly.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@dataclass(frozen=True)
class DriverConfig:
    """The keys of a validated configuration that this driver reads, typed; the sections that
    other modules read whole (``optimizer``) stay mappings."""

    data: loader.DataConfig
    synthetic: SyntheticSpec
    preload: bool
    batch_size: int
    eval_batch_size: int
    num_workers: int
    max_epochs: int
    optimizer: Mapping[str, Any]
    crf: bool
    crf_workers: int | None
    save_scoremaps: bool
    exp_root: Path
    title: str
    cudaid: str | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DriverConfig:
        """The driver's view of a validated configuration."""
        return cls(
            data=loader.DataConfig.from_config(config),
            synthetic=SyntheticSpec.from_config(config["synthetic"]),
            preload=config["preload"],
            batch_size=config["batch_size"],
            eval_batch_size=config["eval_batch_size"],
            num_workers=config["num_workers"],
            max_epochs=config["max_epochs"],
            optimizer=config["optimizer"],
            crf=config["crf"],
            crf_workers=config["crf_workers"],
            save_scoremaps=config["save_scoremaps"],
            exp_root=Path(config["exp_root"]),
            title=Path(config["yaml"]).stem,
            cudaid=config["cudaid"],
        )


def build_data(
    config: DriverConfig,
    context: DistributedContext,
    stack: contextlib.ExitStack,
    evaluated: Sequence[str] = EVALUATED,
    training: bool = True,
) -> dict[str, torch.utils.data.DataLoader]:
    """Loaders of the training set (augmented; unless ``training`` is false) and of the
    ``evaluated`` sets (``valid``, ``test``, ``train_eval``: the training set seen with
    evaluation transforms).

    With ``preload`` the training and validation images are decoded into RAM up front; the test
    set and the training set seen with evaluation transforms are read lazily, but every file is
    decoded once before training so that a corrupt one stops the run before it starts (all of
    them named at once). Splits that share an image are refused. With several processes, each
    one reads its shard.
    Synthetic data are generated if needed and kept unchanged until ``stack`` closes.
    """
    data = config.data
    if data.dataset == "synthetic":
        if context.is_main:
            stack.enter_context(
                synthetic_folds_held(
                    data.data_root, data.fold_folder, config.synthetic, data.folds_name
                )
            )
        distributed.barrier()
    seed, workers = data.seed, config.num_workers
    shard = {"rank": context.rank, "world_size": context.world_size}
    loaders = {}
    if training:
        train_set = loader.build_dataset(data, "train", train=True, preload=config.preload)
        loaders["train"] = loader.make_loader(
            train_set, config.batch_size, workers, shuffle=True, seed=seed, **shard
        )
    for name in evaluated:
        split = EVALUATED_SPLITS[name]
        preload = config.preload and name == "valid"
        dataset = loader.build_dataset(data, split, train=False, preload=preload)
        batch = config.eval_batch_size
        check_batchable(dataset, batch, split)
        loaders[name] = loader.make_loader(
            dataset, batch, workers, shuffle=False, seed=seed, **shard
        )
    datasets = [item.dataset for item in loaders.values()]
    by_file = {dataset.csv_path: dataset.rows for dataset in datasets}
    loader.check_disjoint_splits(by_file)
    on_main(context, lambda: loader.verify_images(lazy_files(datasets), max(1, workers)))
    return loaders


def lazy_files(datasets: list[loader.PhotoDataset]) -> list[Path]:
    """The image and mask files that the datasets read only when a sample is asked for."""
    files = []
    for dataset in datasets:
        if dataset.images is None:
            files += dataset.image_paths
        if not dataset.train and dataset.masks is None:
            files += [path for path in dataset.mask_paths if path is not None]
    return files


def check_batchable(dataset: loader.PhotoDataset, batch: int, split: str) -> None:
    """Batched evaluation (``eval_batch_size > 1``) needs evaluation inputs of a single size."""
    sizes = sorted({tuple(geometry.padded) for geometry in dataset.geometry})
    if batch > 1 and len(sizes) > 1:
        raise ConfigError(
            f"eval_batch_size = {batch}: the {split} images come in {len(sizes)} "
            f"sizes (e.g. {sizes[0]} and {sizes[-1]}); batched evaluation needs "
            f"images of one size, use eval_batch_size: 1"
        )


def epoch_record(epoch: int, lr: float, train: dict, valid: dict, seconds: float) -> dict:
    """One line of ``metrics.jsonl``."""
    record = {"epoch": epoch, "lr": lr, "seconds": round(seconds, 3)}
    record.update({f"train_{key}": value for key, value in train.items()})
    record.update(
        {f"valid_{key}": value for key, value in valid.items() if not key.startswith("n_")}
    )
    return record


def train(
    config: DriverConfig,
    options,
    model: torch.nn.Module,
    loaders: dict,
    settings: RunSettings,
    folder: Path,
    state: dict | None,
    context: DistributedContext,
) -> dict:
    """The epoch loop; returns the best-model record.

    After each epoch: ``checkpoint.pt``, then ``best_model.pt`` if the epoch is the best so far,
    then ``metrics.jsonl`` rewritten from the history, each atomically (see :func:`resume_state`).
    """
    optimizer = build_optimizer(model, config.optimizer)
    best = {"epoch": -1, "valid_cl_error": float("inf")}
    history: list[dict] = []
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        best, history, start = state["best"], state["history"], state["epoch"] + 1
        LOGGER.info("resuming after epoch %d", state["epoch"])
    scaler = settings.precision.scaler
    if scaler is not None and state is not None:
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        else:
            LOGGER.warning(
                "the checkpoint holds no gradient-scaler state; the fp16 loss scale "
                "starts again from its initial value"
            )
    for epoch in range(start, config.max_epochs):
        began = time.perf_counter()
        lr = learning_rate(epoch, config.optimizer["lr"], config.optimizer["lr_scheduler"])
        set_learning_rate(optimizer, lr)
        loader.set_loader_epoch(loaders["train"], epoch)
        erase = settings.erasing.active(epoch)
        bar = tqdm(
            loaders["train"],
            desc=f"epoch {epoch}",
            leave=False,
            disable=True if options.quiet or not context.is_main else None,
        )
        train_stats = train_one_epoch(
            model,
            bar,
            optimizer,
            epoch,
            settings,
            on_batch=lambda s: bar.set_postfix(loss=f"{s['loss']:.3f}"),
        )
        valid_stats = evaluate(
            model, loaders["valid"], settings, progress=bar_label("validation", options, context)
        ).summary
        record = epoch_record(epoch, lr, train_stats, valid_stats, time.perf_counter() - began)
        history.append(record)
        if valid_stats["cl_error"] <= best["valid_cl_error"]:
            best = {"epoch": epoch, "valid_cl_error": valid_stats["cl_error"]}
        if context.is_main:
            save_epoch(unwrap(model), optimizer, epoch, best, history, folder, scaler)
        LOGGER.info(
            "epoch %d/%d lr %.2e erase %s | train loss %.4f err %.2f%% | valid loss "
            "%.4f err %.2f%% F1+ %.2f F1- %.2f | %.1fs",
            epoch,
            config.max_epochs - 1,
            lr,
            erase,
            train_stats["loss"],
            train_stats["cl_error"],
            valid_stats["loss"],
            valid_stats["cl_error"],
            valid_stats["f1_pos"],
            valid_stats["f1_neg"],
            record["seconds"],
        )
    if history and context.is_main:
        erasing = settings.erasing
        plots.plot_learning_curves(
            history,
            folder / "learning_curves.png",
            selected_epoch=best["epoch"],
            erasing_start=erasing.start_epoch if erasing.passes > 0 else None,
        )
    distributed.barrier()
    return best


def save_epoch(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    best: dict,
    history: list[dict],
    folder: Path,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """``checkpoint.pt``, then ``best_model.pt`` if ``epoch`` is the best so far, then
    ``metrics.jsonl`` rewritten from the history, each atomically."""
    state = checkpoint.training_state(network, optimizer, epoch, best, history, scaler)
    checkpoint.save_torch(state, folder / "checkpoint.pt")
    if best["epoch"] == epoch:
        checkpoint.save_torch(network.state_dict(), folder / "best_model.pt")
    files.write_json_lines(history, folder / "metrics.jsonl")


def crf_worker_count(config: DriverConfig, device: torch.device) -> int:
    """``crf_workers``, or by default: in-process on a CPU run (the cores are busy with the
    model), one process per spare core when the model runs on a GPU."""
    if config.crf_workers is not None:
        return config.crf_workers
    return 0 if device.type == "cpu" else max(1, (os.cpu_count() or 2) - 1)


def bar_label(label: str, options, context: DistributedContext) -> str | None:
    """``label`` for a progress bar, or None where no bar is shown (``--quiet``, rank > 0)."""
    return None if options.quiet or not context.is_main else label


def final_evaluation(
    config: DriverConfig,
    options,
    model: torch.nn.Module,
    loaders: dict,
    settings: RunSettings,
    folder: Path,
    context: DistributedContext,
    evaluated: Sequence[str] = EVALUATED,
) -> dict[str, dict]:
    """Evaluate the selected model on the ``evaluated`` sets (by default validation, test and
    training sets).

    With ``crf`` the CRF-refined masks are scored beside the raw ones. When both the validation
    and test sets are evaluated, the threshold that maximises the validation F1+ is reported
    with the test metrics at that threshold. Rank 0 draws the test figures (see
    :func:`draw_test_figures`).
    """
    crf = CRF(crf_params.params_for(config.data.dataset)) if config.crf else None
    results, evaluations = {}, {}
    for name in evaluated:
        panels = name == "test" and context.is_main
        with contextlib.ExitStack() as stack:
            save = None
            if name == "test" and config.save_scoremaps:
                dataset = loaders[name].dataset
                path = scoremap_path(folder, name)
                if context.world_size > 1:
                    path = path.with_suffix(f".rank{context.rank}.npz")
                images = [row.image for row in dataset.rows]
                save = stack.enter_context(scoremap_writer(path, images))
            evaluation = evaluate(
                model,
                loaders[name],
                settings,
                keep=PANEL_IMAGES if panels else 0,
                crf=crf,
                crf_workers=crf_worker_count(config, settings.device),
                progress=bar_label(f"evaluating {name}", options, context),
                on_item=save,
                keep_misclassified=PANEL_MISCLASSIFIED if panels else 0,
                keep_worst=PANEL_WORST if panels else 0,
            )
        results[name], evaluations[name] = evaluation.summary, evaluation
    if "valid" in evaluations and "test" in evaluations:
        sweeps = evaluations["valid"].sweep, evaluations["test"].sweep
        results["best_threshold"] = best_threshold_report(*sweeps)
    if "test" in evaluations and evaluations["test"].records:
        threshold = results.get("best_threshold", {}).get("threshold")
        draw_test_figures(config, evaluations["test"], loaders["test"].dataset, threshold, folder)
    return results


def draw_test_figures(
    config: DriverConfig,
    evaluation: Evaluation,
    dataset: loader.PhotoDataset,
    best_threshold: float | None,
    folder: Path,
) -> None:
    """``test_predictions.png`` and ``.npz`` from the kept test records, and
    ``test_mask_histograms.png`` (with the lines at 0.5 and at ``best_threshold``, the
    validation set's best) when a test image has a mask."""
    class_names = loader.load_encoding(config.data.name_classes, loader.fold_dir(config.data))
    samples = prediction_samples(evaluation.records, dataset, class_names)
    plots.save_mask_panels(samples, folder / "test_predictions.png", title="test predictions")
    experiment.save_prediction_samples(samples, folder / "test_predictions.npz")
    if evaluation.sweep.n_images:
        plots.plot_score_histograms(
            evaluation.pxap.coarse_counts(HISTOGRAM_BINS),
            folder / "test_mask_histograms.png",
            title="test set: mask values inside / outside the ground truth",
            best_threshold=best_threshold,
        )
    else:
        LOGGER.warning("no test image has a mask: test_mask_histograms.png is not drawn")


def prediction_samples(
    records: list[dict], dataset: loader.PhotoDataset, encoding: dict[str, int]
) -> list[dict]:
    """Image, ground truth (when the image has one), continuous (and CRF) mask, caption,
    correctness and CRF scores of the kept test records. The caption of a record kept for
    being misclassified or of lowest F1+ starts with that reason."""
    names = {value: key for key, value in encoding.items()}
    samples = []
    for record in records:
        image = dataset.original_image(record["index"])
        truth = record["truth"]
        localization = (
            "no mask"
            if truth is None
            else f"F1+ {100 * record['f1_pos']:.1f} F1- {100 * record['f1_neg']:.1f}"
        )
        reason = "" if record["kept"] == "first" else f"{record['kept']} | "
        caption = (
            f"{reason}true {names[record['label']]} | predicted {names[record['predicted']]} "
            f"({100 * record['probability']:.0f}%) | {localization}"
        )
        sample = {
            "index": record["index"],
            "image": image,
            "pred_mask": record["mask"][0].numpy(),
            "caption": caption,
            "correct": record["correct"],
        }
        if truth is not None:
            sample["gt_mask"] = truth[0].numpy()
        if "crf_mask" in record:
            sample["crf_mask"] = record["crf_mask"][0].numpy()
            if truth is not None:
                sample["crf_caption"] = (
                    f"F1+ {100 * record['crf_f1_pos']:.1f} F1- {100 * record['crf_f1_neg']:.1f}"
                )
        samples.append(sample)
    return samples


def planned_folder(config: dict, exp_root: Path, options) -> Path:
    """The experiment folder of this run, checked before anything is built or written."""
    if not options.resume:
        name = options.exp_name or experiment.experiment_name(config)
        return experiment.experiment_folder(exp_root, name, options.overwrite)
    if options.exp_name or options.overwrite:
        raise ConfigError(
            "--resume continues a run in its own folder; drop --exp-name and --overwrite"
        )
    return Path(options.resume)


def open_folder(folder: Path, config: dict, options) -> None:
    """Record the run in ``folder``: configuration, class names and environment for a new run,
    the environment of the resume for a resumed one (whose configuration stays as it was)."""
    record = experiment.environment_record(config, sys.argv) | pretrained_trunk_record(config)
    if options.resume:
        experiment.add_resume_record(record, folder / "environment.json")
        return
    save_config(config, folder / "config.yaml")
    files.write_json(record, folder / "environment.json")
    data = loader.DataConfig.from_config(config)
    write_class_names(folder, loader.load_encoding(data.name_classes, loader.fold_dir(data)))


def resume_state(folder: Path) -> dict | None:
    """The checkpoint of ``folder``, with the files written after it made consistent with it;
    None when no epoch of the run had finished (it starts again from epoch 0).

    A run killed after saving the checkpoint of epoch ``k`` may miss ``k``'s line of
    ``metrics.jsonl`` or, if ``k`` was the best epoch, its ``best_model.pt`` (the weights of the
    checkpoint itself); both are rewritten from the checkpoint, and stale temporary files go.
    """
    experiment.remove_temporary_files(folder)
    if not (folder / "checkpoint.pt").is_file():
        LOGGER.info("no epoch of the run in %s had finished; training starts at epoch 0", folder)
        return None
    state = checkpoint.read_training_state(folder / "checkpoint.pt")
    files.write_json_lines(state["history"], folder / "metrics.jsonl")
    if state["best"]["epoch"] == state["epoch"]:
        checkpoint.save_torch(state["model"], folder / "best_model.pt")
    return state


def train_and_evaluate(
    config: DriverConfig,
    options,
    model: torch.nn.Module,
    loaders: dict,
    settings: RunSettings,
    folder: Path,
    state: dict | None,
    context: DistributedContext,
) -> dict[str, dict]:
    """Train (or continue), reload the selected epoch, evaluate it and write the results."""
    best = train(config, options, model, loaders, settings, folder, state, context)
    if best["epoch"] >= 0:
        unwrap(model).load_state_dict(
            torch.load(folder / "best_model.pt", map_location=settings.device, weights_only=True)
        )
    results = final_evaluation(config, options, model, loaders, settings, folder, context)
    final = {"best_epoch": best["epoch"], **results}
    if context.is_main:
        selected = (
            f"selected epoch {best['epoch']}"
            if best["epoch"] >= 0
            else "no epoch trained: the initial weights (path_pre_trained, if set) were evaluated"
        )
        write_results(final, config.title, selected, folder)
    return final


def selected_weights(folder: Path, config: dict) -> tuple[Path, str]:
    """The weights ``--evaluate`` scores and what they are: the run's ``best_model.pt`` (its
    selected epoch), or the ``path_pre_trained`` of a run that trained no epoch."""
    if (folder / "best_model.pt").is_file():
        epoch = "?"
        if (folder / "checkpoint.pt").is_file():
            epoch = checkpoint.read_training_state(folder / "checkpoint.pt")["best"]["epoch"]
        return folder / "best_model.pt", f"selected epoch {epoch} (best_model.pt)"
    if config["path_pre_trained"]:
        weights = Path(config["path_pre_trained"])
        return weights, f"no epoch trained: the weights of {weights}"
    raise RunError(
        f"--evaluate {folder}: no best_model.pt (no epoch of the run has finished) and no "
        f"path_pre_trained in its config.yaml"
    )


def evaluate_experiment(
    config: dict,
    view: DriverConfig,
    options,
    settings: RunSettings,
    context: DistributedContext,
) -> dict[str, dict]:
    """``--evaluate EXP_DIR``: the run's selected model on the ``--sets`` (default: test), with
    the CRF if asked, written to ``EXP_DIR/evaluation/``; the run's own files stay as they
    are."""
    folder = Path(options.evaluate)
    out = folder / experiment.EVALUATION_FOLDER
    names = ["train_eval" if name == "train" else name for name in options.sets or ("test",)]
    weights, selected = on_main(context, lambda: selected_weights(folder, config))
    with contextlib.ExitStack() as stack:
        loaders = build_data(view, context, stack, names, training=False)
        model = build_network(network_config(config), settings.device)
        checkpoint.load_model_weights(model, weights)
        if context.is_main:
            stack.enter_context(experiment.folder_lock(folder))
            out.mkdir(exist_ok=True)
            stack.enter_context(experiment.file_logging(out / "evaluation.log"))
        LOGGER.info("evaluating %s: %s, on %s", folder, selected, ", ".join(names))
        results = final_evaluation(view, options, model, loaders, settings, out, context, names)
        if context.is_main:
            write_results(results, view.title, selected, out)
    return results


def write_results(final: dict, title: str, selected: str, folder: Path) -> None:
    """``final_metrics.json`` and ``results.md`` in ``folder``; print and log the summary.
    ``selected`` says which weights were evaluated."""
    files.write_json(final, folder / "final_metrics.json")
    table = experiment.results_table({name: final[name] for name in EVALUATED if name in final})
    files.write_text(f"# {title}\n\n{selected}\n\n{table}", folder / "results.md")
    summary = results_summary(final.get("test"), selected, folder, table)
    print(summary)
    LOGGER.info("%s", summary, extra=experiment.FILE_ONLY)


def results_summary(test: dict | None, selected: str, folder: Path, table: str) -> str:
    """What a finished evaluation prints: the evaluated weights, the table and the test
    metrics (when the test set was evaluated)."""
    lines = [f"\n{selected}; results in {folder}\n{table}"]
    if test is None:
        return lines[0]
    lines += [
        f"test: cl. error {test['cl_error']:.2f}% | F1+ {test['f1_pos']:.2f} | "
        f"F1- {test['f1_neg']:.2f} | F1+ of an all-ones mask {test['f1_pos_all_ones']:.2f} | "
        f"IoU {test['iou']:.2f} | PxAP {test['pxap']:.2f}",
    ]
    if "crf_f1_pos" in test:
        lines.append(
            f"test with CRF: F1+ {test['crf_f1_pos']:.2f} | F1- {test['crf_f1_neg']:.2f} | "
            f"IoU {test['crf_iou']:.2f}"
        )
    return "\n".join(lines)


def explain_failure(error: BaseException, folder: Path, new_run: bool) -> None:
    """Tell (as a note of ``error``) what the failed run left in ``folder``.

    A new run that failed before its first checkpoint is removed: nothing half-written stays.
    """
    if (folder / "checkpoint.pt").is_file():
        error.add_note(
            f"the last finished epoch is saved in {folder}; continue with: "
            f"python train_deepmil.py --resume {folder}"
        )
    elif new_run:
        experiment.discard_run(folder)
        error.add_note(f"no epoch had finished; {folder} was removed")


def on_main(context: DistributedContext, function: Callable[[], Any]) -> Any:
    """Run ``function`` on rank 0 only and give its result (or its error) to every process."""
    outcome = None
    if context.is_main:
        try:
            outcome = (function(), None)
        except Exception as error:
            outcome = (None, error)
    value, error = distributed.broadcast_object(outcome)
    if error is not None:
        raise error
    return value


def finished_results(folder: Path, crf: bool) -> dict | None:
    """The final metrics of a finished run in ``folder``; None when it is not finished, or when
    ``crf`` asks for CRF figures it lacks (the final evaluation then runs again)."""
    path = folder / "final_metrics.json"
    if not path.is_file():
        return None
    final = json.loads(path.read_text(encoding="utf-8"))
    if crf and "crf_f1_pos" not in final.get("test", {}):
        return None
    return final


def run(argv: list[str]) -> dict[str, dict]:
    """The whole experiment; returns the final metrics.

    Configuration, device, experiment folder name, data and model are all checked before the
    folder is created, so that bad input leaves nothing behind. Under ``torchrun`` only rank 0
    writes files and logs.
    """
    experiment.setup_logging(quiet="--quiet" in argv or not distributed.is_main_process())
    config, options = get_yaml_args(argv)
    view = DriverConfig.from_config(config)
    device = select_device(view.cudaid)
    settings = RunSettings.from_config(config, device)
    context = distributed.init_distributed(use_cuda=device.type == "cuda")
    try:
        if options.evaluate:
            return evaluate_experiment(config, view, options, settings, context)
        return run_experiment(config, view, options, settings, context)
    finally:
        distributed.shutdown_distributed(context)


def run_experiment(
    config: dict,
    view: DriverConfig,
    options,
    settings: RunSettings,
    context: DistributedContext,
) -> dict[str, dict]:
    """Everything after the configuration (``config``, recorded as it is, and the driver's
    ``view`` of it) and the device are known."""
    folder = on_main(context, lambda: planned_folder(config, view.exp_root, options))
    reproducibility.set_seed(settings.seed)
    reproducibility.set_deterministic(warn_only=True)
    with contextlib.ExitStack() as stack:
        loaders = build_data(view, context, stack)
        model = build_network(config, settings.device)
        if context.is_main:
            if not options.resume:
                experiment.create_experiment_dir(folder, options.overwrite)
            stack.enter_context(experiment.folder_lock(folder))
        return run_in_folder(config, view, options, model, loaders, settings, folder, context)


def run_in_folder(
    config: dict,
    view: DriverConfig,
    options,
    model: torch.nn.Module,
    loaders: dict,
    settings: RunSettings,
    folder: Path,
    context: DistributedContext,
) -> dict[str, dict]:
    """The run, once its folder exists and is locked: resume or clear it, train, evaluate."""
    state = None
    if options.resume:
        finished = on_main(context, lambda: finished_results(folder, view.crf))
        if finished is not None:
            if context.is_main:
                print(
                    f"{folder}: the run is already finished; its results are in "
                    f"final_metrics.json and results.md (--crf evaluates it again with the CRF "
                    f"if it had none)"
                )
            return finished
        state = on_main(context, lambda: resume_state(folder))
        if state is not None:
            model.load_state_dict(state["model"])
    elif context.is_main and options.overwrite:
        experiment.remove_run_files(folder)
    model = distributed.wrap_model(model, context, settings.device)
    try:
        with contextlib.ExitStack() as logs:
            if context.is_main:
                logs.enter_context(experiment.file_logging(folder / "training.log"))
                open_folder(folder, config, options)
            LOGGER.info(
                "experiment folder: %s (device %s, seed %d, %d process(es))",
                folder,
                settings.device,
                settings.seed,
                context.world_size,
            )
            try:
                return train_and_evaluate(
                    view, options, model, loaders, settings, folder, state, context
                )
            except BaseException as error:
                LOGGER.error(
                    "the run stopped: %s: %s",
                    type(error).__name__,
                    error,
                    extra=experiment.FILE_ONLY,
                )
                raise
    except BaseException as error:
        if context.is_main:
            explain_failure(error, folder, new_run=not options.resume)
        raise


def report(message: str, error: BaseException) -> None:
    """Print ``message`` and the notes of ``error`` on stderr."""
    print("\n".join([message, *getattr(error, "__notes__", [])]), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; turns expected failures into a message and a non-zero exit code:
    1 for an error, 128 + the signal number for SIGINT / SIGTERM."""
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGINT, raise_interrupted)
    try:
        run(sys.argv[1:] if argv is None else argv)
    except Interrupted as stop:
        report(f"\ninterrupted by {stop}", stop)
        return 128 + stop.signum
    except (DeepMILError, OSError) as error:
        report(f"error: {error}", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
