"""The prepared GPU check, run end to end on the CPU on a tiny setting."""

import json

import pytest
import torch

from deepmil import gpucheck

TINY = [
    "--device",
    "cpu",
    "--model",
    "resnet18",
    "--batch",
    "4",
    "--small-batches",
    "2",
    "--size",
    "64",
    "--eval-size",
    "63",
    "--compile-backend",
    "eager",
    "--warmup",
    "0",
    "--repeats",
    "1",
    "--loader-workers",
    "0,1",
]


def tiny_training(root):
    """The training check's options: one epoch on a 64-px synthetic set of 16 images."""
    return [
        "--epochs",
        "1",
        "--train-set",
        "synthetic.image_size=64",
        "crop_size=[64, 64]",
        "synthetic.n_train=16",
        "synthetic.n_test=6",
        "num_workers=0",
        "model.kmax=1.0",
        "model.kmin=1.0",
        f"fold_folder={root / 'folds'}",
    ]


@pytest.mark.slow
def test_the_check_runs_every_section_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    argv = [*TINY, "--out", str(out), "--tolerance", "100", *tiny_training(tmp_path)]
    assert gpucheck.main(argv) == 0
    report = json.loads((out / "gpucheck.json").read_text())
    assert report["failures"] == []
    assert all("error" not in report[name] for name in gpucheck.SECTIONS)
    rows = report["step"]["rows"]
    assert [(row["amp"], row["batch"], row["channels_last"], row["compile"]) for row in rows] == [
        ("fp32", 4, False, None),
        ("fp32", 4, True, None),
        ("fp32", 4, report["step"]["fastest"]["channels_last"], "eager"),
        ("fp32", 2, False, None),
    ]
    assert all(row["erasing_passes_run"] >= 1 and row["step_erasing_s"] > 0 for row in rows)
    assert report["eval"]["rows"][0]["padded"] == "64x64"
    train = report["train"]
    assert train["fp32_runs_identical"] is True
    assert train["test"]["fp32-a"] == train["test"]["fp32-b"]
    assert report["ddp"]["mode"] == "torchrun, 2 processes"
    assert report["loader"]["workers_needed"] >= 1
    assert report["determinism"]["warnings"].keys() == set(gpucheck.DETERMINISTIC_METHODS)
    markdown = (out / "gpucheck.md").read_text()
    assert "## step" in markdown and "## Failed" not in markdown


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("loader exploded")

    monkeypatch.setattr(gpucheck, "check_loader", broken)
    out = tmp_path / "check"
    argv = [*TINY, "--out", str(out), "--sections", "eval", "loader"]
    assert gpucheck.main(argv) == 1
    report = json.loads((out / "gpucheck.json").read_text())
    assert report["failures"] == ["loader: RuntimeError: loader exploded"]
    assert report["eval"]["rows"][0]["batch_1_img_s"] > 0
    assert "RuntimeError: loader exploded" in report["loader"]["trace"]
    assert (
        "## Failed\n\n- loader: RuntimeError: loader exploded" in (out / "gpucheck.md").read_text()
    )
    assert "FAILED: 1 check(s)" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPU")
def test_asking_for_a_gpu_that_is_not_there_is_a_clear_error(tmp_path, capsys):
    assert gpucheck.main(["--out", str(tmp_path / "check")]) == 1
    assert "torch sees no GPU; use --device cpu" in capsys.readouterr().err
    assert not (tmp_path / "check").exists()


def test_the_training_check_refuses_differing_runs(tmp_path, monkeypatch):
    def finished(commands, logs):
        logs.mkdir(parents=True)
        for name in commands:
            folder = tmp_path / "train" / name
            folder.mkdir(parents=True)
            error = 10.0 if name == "fp32-b" else 2.0
            test = {"cl_error": error, "f1_pos": 60.0, "f1_neg": 70.0}
            (folder / "final_metrics.json").write_text(json.dumps({"test": test}))
            (logs / f"{name}.log").write_text("")
        return dict.fromkeys(commands, 1.0)

    monkeypatch.setattr(gpucheck, "run_in_parallel", finished)
    monkeypatch.setattr(gpucheck, "prepare_synthetic", lambda argv: None)
    args = gpucheck.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(gpucheck.CheckFailed, match="the two float32 runs differ"):
        gpucheck.check_train(args, torch.device("cpu"))
