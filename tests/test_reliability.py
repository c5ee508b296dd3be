"""Reliability of ``train_deepmil.py``: reproducibility, checkpoint/resume, interruption and bad
input, on a tiny synthetic dataset (64x64 images, 16 training and 6 test images)."""

import errno
import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

import deepmil.engine
import train_deepmil
from deepmil import checkpoint, files
from deepmil.config import CONFIG_DIR
from deepmil.model import build_model
from helpers import (
    BATCH,
    FOLD,
    TRAIN_CSV,
    epoch_metrics,
    final_metrics,
    run_cli,
    start_cli,
    temporary_files,
    tiny_args,
    wait_for_epochs,
)
from tools import get_yaml_args


def assert_refused(cli, args: list[str], root: Path, *expected: str) -> None:
    """The run exits with 1, prints every ``expected`` text and creates no experiment folder."""
    code, err = cli(args)
    assert code == 1, err
    for text in expected:
        assert text in err, (text, err)
    assert not (root / "exps").exists()


def rewrite_csv(root: Path, edit) -> Path:
    """Apply ``edit(lines) -> lines`` to the training CSV of ``root``; returns its path."""
    path = root / TRAIN_CSV
    path.write_text("".join(line + "\n" for line in edit(path.read_text().splitlines())))
    return path


def first_row(root: Path) -> list[str]:
    return (root / TRAIN_CSV).read_text().splitlines()[0].split(",")


# ----------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("name, setting", [("workers", "num_workers=2"), ("lazy", "preload=false")])
def test_workers_and_preloading_do_not_change_the_run(reference, dataset, name, setting):
    result = run_cli(tiny_args(dataset, "--exp-name", name, "--set", setting))
    assert result.returncode == 0, result.stderr
    folder = dataset / "exps" / name
    assert epoch_metrics(folder) == epoch_metrics(reference)
    assert final_metrics(folder) == final_metrics(reference)


def test_the_run_is_recorded(reference):
    config = (reference / "config.yaml").read_text()
    assert "MYSEED: 0" in config and "num_workers: 0" in config
    environment = json.loads((reference / "environment.json").read_text())
    assert environment["seed"] == 0 and environment["torch"] == torch.__version__
    assert {"git_commit", "git_dirty", "command", "numpy", "torch_threads"} <= set(environment)
    state = checkpoint.read_checkpoint(reference / "checkpoint.pt")
    assert set(state) == {"epoch", "model", "optimizer", "best", "history"}
    assert state["epoch"] == 2 and len(state["history"]) == 3
    assert state["best"]["epoch"] == final_metrics(reference)["best_epoch"]
    assert state["optimizer"]["state"], "the momentum buffers are saved"
    assert (reference / "learning_curves.png").is_file() and not temporary_files(reference)


# ----------------------------------------------------------------------------- resume


def test_a_killed_run_resumes_to_the_same_result(reference, dataset):
    folder = dataset / "exps" / "killed"
    process = start_cli(tiny_args(dataset, "--exp-name", "killed"))
    wait_for_epochs(process, folder / "metrics.jsonl", 1)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finished = len((folder / "metrics.jsonl").read_text().splitlines())
    assert finished in (1, 2) and not (folder / "final_metrics.json").exists()
    config = (folder / "config.yaml").read_text()
    result = run_cli(["--resume", str(folder), "--cudaid", "cpu", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert epoch_metrics(folder) == epoch_metrics(reference)
    assert final_metrics(folder) == final_metrics(reference)
    assert (folder / "config.yaml").read_text() == config
    assert len(json.loads((folder / "environment.json").read_text())["resumed"]) == 1
    assert (folder / "learning_curves.png").is_file() and not temporary_files(folder)


def test_resume_repairs_what_follows_the_checkpoint(reference, tmp_path):
    """A kill right after ``checkpoint.pt`` leaves an old ``metrics.jsonl`` and ``best_model.pt``."""
    folder = shutil.copytree(reference, tmp_path / "run")
    state = checkpoint.read_checkpoint(folder / "checkpoint.pt")
    state["best"]["epoch"] = state["epoch"]
    checkpoint.save_torch(state, folder / "checkpoint.pt")
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    (folder / "best_model.pt").unlink()
    (folder / ".checkpoint.pt.x.tmp").write_bytes(b"partial")
    train_deepmil.resume_state(folder)
    assert epoch_metrics(folder) == epoch_metrics(reference)
    best = torch.load(folder / "best_model.pt", weights_only=True)
    assert all(torch.equal(best[key], value) for key, value in state["model"].items())
    assert not temporary_files(folder)


def test_sigterm_stops_with_a_resume_hint(dataset):
    folder = dataset / "exps" / "terminated"
    process = start_cli(tiny_args(dataset, "--exp-name", "terminated"))
    wait_for_epochs(process, folder / "metrics.jsonl", 1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err
    assert f"python train_deepmil.py --resume {folder}" in err
    assert "ERROR the run stopped: Interrupted: SIGTERM" in (folder / "training.log").read_text()
    assert "the run stopped" not in err
    state = checkpoint.read_checkpoint(folder / "checkpoint.pt")
    assert state["epoch"] + 1 == len(epoch_metrics(folder))
    assert not temporary_files(folder)


# ----------------------------------------------------------------------------- failures in training


def nan_after(calls: int, monkeypatch) -> None:
    """Make the training step's ``L_pos`` NaN from its ``calls``-th call (0-based) on."""
    real = deepmil.engine.plain_step
    count = iter(range(10**6))

    def step(*args, **kwargs):
        stats = real(*args, **kwargs)
        if next(count) >= calls:
            stats["loss_pos"] = torch.tensor(float("nan"))
        return stats

    monkeypatch.setattr(deepmil.engine, "plain_step", step)


def test_a_non_finite_loss_keeps_the_last_checkpoint(cli, dataset, monkeypatch):
    batches = math.ceil(len((dataset / TRAIN_CSV).read_text().splitlines()) / BATCH)
    nan_after(batches, monkeypatch)
    code, err = cli(tiny_args(dataset, "--exp-name", "nan", "--epoch", "2"))
    folder = dataset / "exps" / "nan"
    assert code == 1
    assert "non-finite training loss at epoch 1, batch 0: loss_seg=" in err
    assert "loss_pos=nan" in err and f"--resume {folder}" in err
    assert checkpoint.read_checkpoint(folder / "checkpoint.pt")["epoch"] == 0


def test_a_run_failing_in_its_first_epoch_leaves_no_folder(cli, dataset, monkeypatch):
    nan_after(0, monkeypatch)
    code, err = cli(tiny_args(dataset, "--exp-name", "nan-first"))
    assert code == 1 and "at epoch 0, batch 0" in err
    assert "no epoch had finished" in err
    assert not (dataset / "exps" / "nan-first").exists()


class FullDisk:
    """A write stream that fails with ENOSPC after ``room`` bytes."""

    def __init__(self, stream, room: int) -> None:
        self.stream, self.room = stream, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


def test_a_full_disk_keeps_the_previous_checkpoint(cli, dataset, monkeypatch):
    """The first two saves (checkpoint and best model of epoch 0) pass, the third fails."""
    real_save, count = torch.save, iter(range(10**6))

    def save(obj, stream):
        real_save(obj, stream if next(count) < 2 else FullDisk(stream, 4096))

    monkeypatch.setattr(torch, "save", save)
    code, err = cli(tiny_args(dataset, "--exp-name", "full", "--epoch", "2"))
    folder = dataset / "exps" / "full"
    assert code == 1
    assert f"cannot write {folder / 'checkpoint.pt'}: No space left on device" in err
    assert f"--resume {folder}" in err
    assert checkpoint.read_checkpoint(folder / "checkpoint.pt")["epoch"] == 0
    assert not temporary_files(folder)


def test_a_failing_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_torch({"epoch": 0}, path)

    def write(stream) -> None:
        torch.save({"epoch": 1, "weights": torch.zeros(10**5)}, FullDisk(stream, 1000))

    with pytest.raises(OSError, match="No space left on device") as error:
        files.atomic_write(path, write)
    assert error.value.errno == errno.ENOSPC and str(path) in str(error.value)
    assert checkpoint.read_checkpoint(path) == {"epoch": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# ----------------------------------------------------------------------------- bad input


def test_unknown_config_key(cli, own_data):
    path = own_data / "bad.yaml"
    path.write_text((CONFIG_DIR / "synthetic-4-erasing.yaml").read_text() + "batch_sise: 4\n")
    args = tiny_args(own_data)
    args[1] = str(path)
    assert_refused(
        cli, args, own_data, "bad.yaml", "unknown key batch_sise", "did you mean batch_size"
    )


def test_wrong_type(cli, own_data):
    assert_refused(
        cli,
        tiny_args(own_data, "--set", "batch_size=four"),
        own_data,
        "batch_size = 'four' has the wrong type",
    )


def test_out_of_range_value(cli, own_data):
    assert_refused(
        cli,
        tiny_args(own_data, "--set", "model.dropout=1.5"),
        own_data,
        "model.dropout = 1.5 is out of range",
        "[0, 1)",
    )


def test_missing_yaml(cli, own_data):
    args = tiny_args(own_data)
    args[1] = str(own_data / "missing.yaml")
    assert_refused(cli, args, own_data, f"configuration '{own_data / 'missing.yaml'}' not found")


def test_missing_dataset_root(cli, own_data):
    args = [
        "--yaml",
        "glas-no-erasing.yaml",
        "--cudaid",
        "cpu",
        "--set",
        "fold_name=synthetic",
        "--set",
        f"fold_folder={own_data / 'folds'}",
        "--data-root",
        str(own_data / "nowhere"),
        "--exp-root",
        str(own_data / "exps"),
        "--quiet",
    ]
    assert_refused(
        cli, args, own_data, f"dataset folder not found: {own_data / 'nowhere'}", "--data-root"
    )


def test_missing_fold_csv(cli, own_data):
    assert_refused(
        cli,
        tiny_args(own_data, "--fold", "1"),
        own_data,
        f"fold CSV not found: {own_data / FOLD.parent / 'fold_1' / 'train_s_0_f_1.csv'}",
    )


def test_empty_fold_csv(cli, own_data):
    path = rewrite_csv(own_data, lambda lines: [])
    assert_refused(cli, tiny_args(own_data), own_data, f"fold CSV is empty: {path}")


def test_bad_fold_csv_row(cli, own_data):
    path = rewrite_csv(own_data, lambda lines: lines + ["images/x.png,class_0"])
    count = len(path.read_text().splitlines())
    assert_refused(
        cli,
        tiny_args(own_data),
        own_data,
        f"{path}, line {count}: expected 3 columns (image, mask, class), got 2",
    )


def test_unknown_class(cli, own_data):
    path = rewrite_csv(own_data, lambda lines: [lines[0].rsplit(",", 1)[0] + ",zebra", *lines[1:]])
    assert_refused(cli, tiny_args(own_data), own_data, f"{path}, line 1: unknown class 'zebra'")


def test_missing_image(cli, own_data):
    path = rewrite_csv(
        own_data, lambda lines: ["images/gone.png," + lines[0].split(",", 1)[1], *lines[1:]]
    )
    assert_refused(
        cli,
        tiny_args(own_data),
        own_data,
        f"file not found: {own_data / 'data' / 'synthetic' / 'images' / 'gone.png'} "
        f"(listed in {path}, line 1)",
    )


def test_truncated_image(cli, own_data):
    image = own_data / "data" / "synthetic" / first_row(own_data)[0]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    assert_refused(cli, tiny_args(own_data), own_data, f"cannot decode image {image}")


def test_mask_of_another_size(cli, own_data):
    mask = own_data / "data" / "synthetic" / first_row(own_data)[1]
    Image.new("L", (32, 48)).save(mask)
    assert_refused(
        cli,
        tiny_args(own_data),
        own_data,
        f"mask size (48, 32) of {mask} differs from image size (64, 64)",
    )


def test_encoding_inconsistent_with_num_classes(cli, own_data):
    (own_data / FOLD / "encoding.yaml").write_text("{class_0: 0, class_1: 1, class_2: 2}\n")
    assert_refused(cli, tiny_args(own_data), own_data, "has 3 classes but model.num_classes is 2")


@pytest.mark.parametrize("change", [{"num_classes": 3}, {"name": "tv_resnet18"}])
def test_checkpoint_of_another_model(cli, own_data, change):
    config, _ = get_yaml_args(tiny_args(own_data))
    path = own_data / "other.pt"
    torch.save(build_model({**config["model"], **change}).state_dict(), path)
    assert_refused(
        cli,
        tiny_args(own_data, "--path_pre_trained", str(path)),
        own_data,
        f"checkpoint {path} does not fit this model",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_absent_gpu(cli, own_data):
    args = tiny_args(own_data)
    args[args.index("--cudaid") + 1] = "0"
    assert_refused(cli, args, own_data, "--cudaid 0: no GPU is visible; use --cudaid cpu")


def test_existing_experiment_folder(cli, own_data):
    folder = own_data / "exps" / "taken"
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"an older run")
    (folder / "notes.txt").write_text("kept")
    code, err = cli(tiny_args(own_data, "--exp-name", "taken"))
    assert code == 1
    assert f"experiment folder {folder} already exists; use --overwrite" in err
    assert (folder / "checkpoint.pt").read_bytes() == b"an older run"
    code, err = cli(tiny_args(own_data, "--exp-name", "taken", "--overwrite", "--epoch", "0"))
    assert code == 0, err
    assert not (folder / "checkpoint.pt").exists() and (folder / "final_metrics.json").is_file()
    assert (folder / "notes.txt").read_text() == "kept"
