"""End-to-end runs of ``train_deepmil.py`` in a subprocess on a tiny synthetic dataset. Most
tests read or compare with the session's ``reference`` run (tests/conftest.py)."""

import json
import math

import numpy as np
import pytest

import loader
from deepmil import predict
from deepmil.config import load_config
from deepmil.scoremaps import read_scoremaps, scoremap_path
from helpers import epoch_metrics, final_metrics, only_folder, run_cli, tiny_args

EXPECTED_FILES = [
    "config.yaml",
    "environment.json",
    "training.log",
    "metrics.jsonl",
    "checkpoint.pt",
    "best_model.pt",
    "final_metrics.json",
    "results.md",
    "learning_curves.png",
    "test_predictions.png",
    "test_predictions.npz",
    "test_mask_histograms.png",
]


def test_cli_writes_the_experiment_folder(reference_run, reference):
    assert reference_run.returncode == 0, reference_run.stderr
    for name in EXPECTED_FILES:
        assert (reference / name).is_file(), name
    final = final_metrics(reference)
    assert set(final) == {"best_epoch", "valid", "test", "train_eval", "best_threshold"}
    assert final["test"]["n_images"] == 6
    for key in ("cl_error", "f1_pos", "f1_neg", "f1_pos_all_ones"):
        assert 0.0 <= final["test"][key] <= 100.0
    records = epoch_metrics(reference)
    assert [record["epoch"] for record in records] == [0, 1, 2]
    assert final["best_epoch"] in (0, 1, 2)
    assert reference_run.stdout.count("F1+ of an all-ones mask") == 1
    log = (reference / "training.log").read_text()
    assert f"selected epoch {final['best_epoch']}; results in {reference}" in log
    assert f"test: cl. error {final['test']['cl_error']:.2f}%" in log


def test_two_runs_give_identical_metrics(reference, dataset):
    result = run_cli(tiny_args(dataset, "--exp-name", "again"))
    assert result.returncode == 0, result.stderr
    again = dataset / "exps" / "again"
    assert final_metrics(again) == final_metrics(reference)
    assert epoch_metrics(again) == epoch_metrics(reference)


def test_another_seed_gives_another_run(reference, dataset):
    result = run_cli(tiny_args(dataset, "--exp-name", "seed-1"), env={"MYSEED": "1"})
    assert result.returncode == 0, result.stderr
    seeded = dataset / "exps" / "seed-1"
    assert epoch_metrics(seeded) != epoch_metrics(reference)
    assert json.loads((seeded / "environment.json").read_text())["seed"] == 1


def test_bad_input_is_a_clear_error(tmp_path):
    result = run_cli(["--yaml", "no-such-config.yaml", "--cudaid", "cpu"])
    assert result.returncode == 1
    assert "no-such-config.yaml" in result.stderr
    result = run_cli(["--yaml", "synthetic-no-erasing.yaml", "--cudaid", "7"])
    assert result.returncode == 1 and "--cudaid 7" in result.stderr


def test_evaluation_only_run_reproduces_the_selected_model(reference, dataset):
    args = tiny_args(
        dataset,
        "--exp-name",
        "eval-only",
        "--epoch",
        "-1",
        "--path_pre_trained",
        str(reference / "best_model.pt"),
    )
    result = run_cli(args)
    assert result.returncode == 0, result.stderr
    evaluated = final_metrics(dataset / "exps" / "eval-only")
    trained = final_metrics(reference)
    assert evaluated["best_epoch"] == -1
    for name in ("valid", "test", "train_eval"):
        assert evaluated[name] == trained[name]


def test_batched_evaluation_run_gives_the_image_by_image_metrics(reference, dataset):
    result = run_cli(tiny_args(dataset, "--exp-name", "batched", "--set", "eval_batch_size=4"))
    assert result.returncode == 0, result.stderr
    batched = final_metrics(dataset / "exps" / "batched")
    image_by_image = final_metrics(reference)
    assert batched["best_epoch"] == image_by_image["best_epoch"]
    # Batched convolutions round differently (~1e-6); on the near-flat maps of a three-epoch model
    # that flips a few pixels lying at the 0.5 threshold: localisation metrics (x100) may move by
    # a few hundredths, losses by about 1e-7 of their value (the untrained localizer's loss can
    # be in the thousands), the predicted classes not at all.
    for name in ("valid", "test", "train_eval"):
        assert batched[name]["cl_error"] == image_by_image[name]["cl_error"]
        for key, value in image_by_image[name].items():
            if key.startswith("loss"):
                expected = pytest.approx(value, rel=1e-6, abs=1e-4)
            else:
                expected = pytest.approx(value, abs=0.05)
            assert batched[name][key] == expected, (name, key)


def test_bf16_channels_last_run(tmp_path):
    """Two epochs (no erasing) on a fresh root: the run generates the synthetic folds itself."""
    result = run_cli(
        tiny_args(
            tmp_path,
            "--epoch",
            "2",
            "--set",
            "amp=bf16",
            "--set",
            "channels_last=true",
            exp_root="bf16",
        )
    )
    assert result.returncode == 0, result.stderr
    folder = only_folder(tmp_path / "bf16")
    assert "amp: bf16" in (folder / "config.yaml").read_text()
    records = epoch_metrics(folder)
    assert len(records) == 2
    for record in records:
        for key in ("train_loss", "valid_loss", "valid_f1_pos"):
            assert math.isfinite(record[key]), (key, record)
    test = final_metrics(folder)["test"]
    assert 0.0 <= test["f1_pos"] <= 100.0 and 0.0 <= test["cl_error"] <= 100.0
    assert (tmp_path / "folds" / "synthetic" / "split_0" / "fold_0" / "encoding.yaml").is_file()


def test_fp16_on_the_cpu_is_refused_before_anything_is_written(tmp_path):
    result = run_cli(tiny_args(tmp_path, "--set", "amp=fp16", exp_root="fp16"))
    assert result.returncode == 1
    assert "amp = 'fp16' needs a CUDA device" in result.stderr
    assert not (tmp_path / "fp16").exists() and not (tmp_path / "data").exists()


def test_cam_run_then_post_hoc_grad_cam_on_its_classifier(dataset, tmp_path):
    def args(exp_root: str, *extra: str) -> list[str]:
        """Two epochs, no erasing, experiment folders under ``tmp_path``."""
        return tiny_args(
            dataset, "--epoch", "2", "--nbrerase", "0", *extra, exp_root=str(tmp_path / exp_root)
        )

    cam = run_cli(args("cam", "--method", "cam"))
    assert cam.returncode == 0, cam.stderr
    trained = only_folder(tmp_path / "cam")
    assert trained.name.startswith("synthetic-4-erasing-cam-resnet18-")
    grad_cam = run_cli(
        args(
            "gradcam",
            "--method",
            "gradcam",
            "--epoch",
            "-1",
            "--path_pre_trained",
            str(trained / "best_model.pt"),
        )
    )
    assert grad_cam.returncode == 0, grad_cam.stderr
    cam_test = final_metrics(trained)["test"]
    grad_cam_test = final_metrics(only_folder(tmp_path / "gradcam"))["test"]
    assert grad_cam_test["cl_error"] == cam_test["cl_error"]
    assert grad_cam_test["loss_cl"] == cam_test["loss_cl"]
    assert "loss_pos" not in cam_test
    # The maps were computed in the run's process: equal up to float rounding here (the exact
    # equality of prediction and evaluation in one process is tests/test_predict.py's).
    for folder in (trained, only_folder(tmp_path / "gradcam")):
        predictor = predict.load(config=folder / "config.yaml", weights=trained / "best_model.pt")
        stored = next(read_scoremaps(scoremap_path(folder, "test")))
        data = loader.DataConfig.from_config(load_config(folder / "config.yaml"))
        result = predictor.predict(loader.dataset_root(data) / stored["image"])
        np.testing.assert_allclose(result.map, stored["mask"][0].numpy(), rtol=0, atol=1e-5)
        assert result.predicted == stored["predicted"]
    erasing = run_cli(tiny_args(dataset, "--method", "wildcat", exp_root=str(tmp_path / "refused")))
    assert erasing.returncode == 1 and "for method 'wildcat'" in erasing.stderr
