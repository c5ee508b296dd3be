"""Train and evaluate the min-max entropy model.

    python train_deepmil.py --yaml synthetic-4-erasing.yaml [--cudaid cpu] [overrides]

Reads ``config_yaml/<name>``, applies the command-line overrides, trains with recursive erasing,
selects the epoch with the lowest validation classification error and evaluates it on the
validation, test and training sets. Everything is written to one experiment folder.
"""
from __future__ import annotations

import copy
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import loader
import reproducibility
from create_folds import ensure_synthetic_folds
from deepmil import checkpoint, experiment, plots
from deepmil.config import ConfigError, save_config
from deepmil.engine import NonFiniteLossError, erasing_active, evaluate, train_one_epoch
from deepmil.model import DEEP_STEM_LAYERS, build_model, load_pretrained_trunk
from deepmil.synthetic import SyntheticSpec
from deepmil.optim import build_optimizer, learning_rate, set_learning_rate
from tools import get_yaml_args

LOGGER = logging.getLogger("train_deepmil")
PANEL_IMAGES = 6


class Interrupted(Exception):
    """Raised by the SIGINT / SIGTERM handler to stop between training steps."""


def raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def select_device(cudaid: str | None) -> torch.device:
    """``None``: the first GPU if there is one, else the CPU; ``"cpu"``; or a GPU index."""
    if cudaid is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if cudaid == "cpu":
        return torch.device("cpu")
    if "," in cudaid:
        raise ConfigError(f"--cudaid {cudaid}: several GPUs are used through torchrun, e.g. "
                          f"'torchrun --nproc_per_node=2 train_deepmil.py ...'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not cudaid.isdigit() or int(cudaid) >= count:
        raise ConfigError(f"--cudaid {cudaid}: no such GPU ({count} visible); use --cudaid cpu "
                          f"or an index below {count}")
    return torch.device(f"cuda:{cudaid}")


def build_data(config: dict) -> dict[str, torch.utils.data.DataLoader]:
    """Loaders of the training set (augmented) and of the three evaluation sets."""
    if config["dataset"] == "synthetic":
        ensure_synthetic_folds(Path(config["data_root"]), Path(config["fold_folder"]),
                               SyntheticSpec.from_config(config["synthetic"]),
                               config["fold_name"] or config["dataset"])
    seed, workers = config["MYSEED"], config["num_workers"]
    train_set = loader.build_dataset(config, "train", train=True)
    loaders = {"train": loader.make_loader(train_set, config["batch_size"], workers,
                                           shuffle=True, seed=seed)}
    for split, name in (("valid", "valid"), ("test", "test"), ("train", "train_eval")):
        dataset = loader.build_dataset(config, split, train=False, preload=split == "valid")
        loaders[name] = loader.make_loader(dataset, 1, workers, shuffle=False, seed=seed)
    return loaders


def build_network(config: dict, device: torch.device) -> torch.nn.Module:
    """The model with ImageNet or user weights as the configuration asks."""
    reproducibility.set_seed(config["MYSEED"])
    model = build_model(config["model"])
    if config["model"]["pretrained"] and config["model"]["name"] in DEEP_STEM_LAYERS:
        load_pretrained_trunk(model, config["model"]["pretrained_cache"])
    if config["path_pre_trained"]:
        checkpoint.load_model_weights(model, Path(config["path_pre_trained"]), config["strict"])
        LOGGER.info("loaded weights from %s", config["path_pre_trained"])
    return model.to(device)


def epoch_record(epoch: int, lr: float, train: dict, valid: dict, seconds: float) -> dict:
    """One line of ``metrics.jsonl``."""
    record = {"epoch": epoch, "lr": lr, "seconds": round(seconds, 3)}
    record.update({f"train_{key}": value for key, value in train.items()})
    record.update({f"valid_{key}": value for key, value in valid.items() if key != "n_images"})
    return record


def train(config: dict, options, model: torch.nn.Module, loaders: dict, device: torch.device,
          folder: Path, state: dict | None) -> dict:
    """The epoch loop; returns the best-model record. Saves a resumable checkpoint per epoch."""
    optimizer = build_optimizer(model, config["optimizer"])
    best = {"epoch": -1, "valid_cl_error": float("inf")}
    history: list[dict] = []
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        best, history, start = state["best"], state["history"], state["epoch"] + 1
        LOGGER.info("resuming after epoch %d", state["epoch"])
    seed = config["MYSEED"]
    for epoch in range(start, config["max_epochs"]):
        began = time.perf_counter()
        lr = learning_rate(epoch, config["optimizer"]["lr"], config["optimizer"]["lr_scheduler"])
        set_learning_rate(optimizer, lr)
        loader.set_loader_epoch(loaders["train"], epoch)
        erase = erasing_active(epoch, config["nbr_times_erase"], config["epoch_start_erasing"])
        bar = tqdm(loaders["train"], desc=f"epoch {epoch}", leave=False,
                   disable=True if options.quiet else None)
        train_stats = train_one_epoch(
            model, bar, optimizer, epoch, seed, device, config["nbr_times_erase"],
            config["sigma_erase"], erase, on_batch=lambda s: bar.set_postfix(loss=f"{s['loss']:.3f}"))
        valid_stats, _ = evaluate(model, loaders["valid"], device, config["exact_eval_crop"])
        record = epoch_record(epoch, lr, train_stats, valid_stats, time.perf_counter() - began)
        history.append(record)
        if valid_stats["cl_error"] <= best["valid_cl_error"]:
            best = {"epoch": epoch, "valid_cl_error": valid_stats["cl_error"]}
            checkpoint.save_torch(model.state_dict(), folder / "best_model.pt")
        checkpoint.save_torch(checkpoint.training_state(model, optimizer, epoch, best, history),
                              folder / "checkpoint.pt")
        experiment.append_json_line(record, folder / "metrics.jsonl")
        LOGGER.info("epoch %d/%d lr %.2e erase %s | train loss %.4f err %.2f%% | valid loss "
                    "%.4f err %.2f%% F1+ %.2f F1- %.2f | %.1fs", epoch, config["max_epochs"] - 1,
                    lr, erase, train_stats["loss"], train_stats["cl_error"], valid_stats["loss"],
                    valid_stats["cl_error"], valid_stats["f1_pos"], valid_stats["f1_neg"],
                    record["seconds"])
    if history:
        plots.plot_learning_curves(history, folder / "learning_curves.png")
    return best


def final_evaluation(config: dict, model: torch.nn.Module, loaders: dict, device: torch.device,
                     folder: Path) -> dict[str, dict]:
    """Evaluate the selected model on the validation, test and training sets."""
    results = {}
    for name in ("valid", "test", "train_eval"):
        keep = PANEL_IMAGES if name == "test" else 0
        results[name], records = evaluate(model, loaders[name], device, config["exact_eval_crop"],
                                          keep=keep)
        if records:
            class_names = loader.load_encoding(config["name_classes"], loader.fold_dir(config))
            save_prediction_panels(records, loaders[name].dataset, class_names,
                                   folder / "test_predictions.png")
    return results


def save_prediction_panels(records: list[dict], dataset: loader.PhotoDataset,
                           encoding: dict[str, int], path: Path) -> None:
    """Image, ground truth, thresholded and continuous mask for a few test images."""
    names = {value: key for key, value in encoding.items()}
    samples = []
    for record in records:
        image = loader.load_rgb(dataset.image_paths[record["index"]])
        caption = (f"true {names[record['label']]} | predicted {names[record['predicted']]} "
                   f"({100 * record['probability']:.0f}%) | F1+ {100 * record['f1_pos']:.1f} "
                   f"F1- {100 * record['f1_neg']:.1f}")
        samples.append({"image": np.asarray(image), "gt_mask": record["truth"][0].numpy(),
                        "pred_mask": record["mask"][0].numpy(), "caption": caption})
    plots.save_mask_panels(samples, path, title="test predictions")


def prepare_folder(config: dict, options) -> tuple[Path, dict | None]:
    """The experiment folder (new, or the one being resumed) and the state to resume from."""
    if options.resume:
        folder = Path(options.resume)
        return folder, checkpoint.read_checkpoint(folder / "checkpoint.pt")
    folder = experiment.create_experiment_dir(Path(config["exp_root"]),
                                              experiment.experiment_name(config),
                                              options.overwrite)
    (folder / "metrics.jsonl").unlink(missing_ok=True)
    return folder, None


def run(argv: list[str]) -> dict[str, dict]:
    """The whole experiment; returns the final metrics."""
    experiment.setup_logging(quiet="--quiet" in argv)
    config, options = get_yaml_args(argv)
    device = select_device(config["cudaid"])
    reproducibility.set_seed(config["MYSEED"])
    reproducibility.set_deterministic(warn_only=True)
    loaders = build_data(config)
    model = build_network(config, device)
    if config["max_epochs"] == -1 and not config["path_pre_trained"]:
        raise ConfigError("max_epochs = -1 evaluates a trained model: give its weights with "
                          "--path_pre_trained FILE")
    folder, state = prepare_folder(config, options)
    experiment.setup_logging(folder / "training.log", quiet=options.quiet)
    LOGGER.info("experiment folder: %s (device %s, seed %d)", folder, device, config["MYSEED"])
    save_config(config, folder / "config.yaml")
    experiment.write_json(experiment.environment_record(config, sys.argv), folder / "environment.json")
    if state is not None:
        model.load_state_dict(state["model"])
    try:
        best = train(config, options, model, loaders, device, folder, state)
    except Interrupted as stop:
        raise Interrupted(f"{stop}; the last finished epoch is saved in {folder}. Continue "
                          f"with: python train_deepmil.py --resume {folder}") from None
    if best["epoch"] >= 0:
        model.load_state_dict(torch.load(folder / "best_model.pt", map_location=device,
                                         weights_only=True))
    results = final_evaluation(config, model, loaders, device, folder)
    final = {"best_epoch": best["epoch"], **results}
    experiment.write_json(final, folder / "final_metrics.json")
    table = experiment.results_table(results)
    (folder / "results.md").write_text(f"# {Path(config['yaml']).stem}\n\nbest epoch: "
                                       f"{best['epoch']}\n\n{table}")
    test = results["test"]
    print(f"\nselected epoch {best['epoch']}; results in {folder}\n{table}")
    print(f"test: cl. error {test['cl_error']:.2f}% | F1+ {test['f1_pos']:.2f} | "
          f"F1- {test['f1_neg']:.2f} | F1+ of an all-ones mask {test['f1_pos_all_ones']:.2f}")
    return final


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; turns expected failures into a message and exit code 1."""
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGINT, raise_interrupted)
    try:
        run(sys.argv[1:] if argv is None else argv)
    except Interrupted as stop:
        print(f"\ninterrupted by {stop}", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError,
            RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
