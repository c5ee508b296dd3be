"""The comparison report: tables from experiment folders, the figure, the comparison driver."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from deepmil import compare, plots, report
from deepmil.config import available_configs, load_config, resolve_yaml_path
from deepmil.experiment import load_prediction_samples, save_prediction_samples
from deepmil.registry import METHOD_NAMES


def fake_run(root, name, method, seed, test, erase=0, crf=True, indices=(3, 5)):
    """An experiment folder with a config, final metrics and stored test predictions."""
    folder = root / name
    folder.mkdir()
    config = {
        "MYSEED": seed,
        "method": method,
        "dataset": "synthetic",
        "yaml": f"{name}.yaml",
        "nbr_times_erase": erase,
        "crf": crf,
        "exp_root": str(root),
        "model": {"name": "resnet18", "kmax": 0.5},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "final_metrics.json").write_text(json.dumps({"best_epoch": 3, "test": test}))
    rng = np.random.default_rng(seed)
    samples = [
        {
            "index": index,
            "caption": f"image {index}",
            "image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
            "gt_mask": (rng.random((8, 8)) > 0.5).astype(np.uint8),
            "pred_mask": rng.random((8, 8)).astype(np.float32),
        }
        for index in indices
    ]
    save_prediction_samples(samples, folder / "test_predictions.npz")
    return folder


def metrics(cl_error, f1_pos, f1_neg, pxap, crf=None, iou=None):
    values = {"cl_error": cl_error, "f1_pos": f1_pos, "f1_neg": f1_neg, "pxap": pxap}
    if crf is not None:
        values.update(crf_f1_pos=crf[0], crf_f1_neg=crf[1])
    if iou is not None:
        values.update(iou=iou[0], **({"crf_iou": iou[1]} if crf is not None else {}))
    return values


def test_two_folders_give_the_expected_table(tmp_path, capsys):
    first = fake_run(
        tmp_path, "ours", "minmax", 0, metrics(10, 50, 60, 40, (52, 61), (33, 35)), erase=4
    )
    second = fake_run(tmp_path, "cam", "cam", 0, metrics(5, 30.125, 70, 35.5, (31, 69), (18, 19)))
    markdown, latex = tmp_path / "t.md", tmp_path / "t.tex"
    assert (
        report.main([str(first), str(second), "--markdown", str(markdown), "--latex", str(latex)])
        == 0
    )
    expected = (
        "### synthetic: test set, mean ± std over seeds\n\n"
        "| method | seeds | cl. error (%) | F1+ (%) | F1- (%) | IoU (%) | PxAP (%) | CRF F1+ (%) "
        "| CRF F1- (%) | CRF IoU (%) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| CAM | 0 | 5.00 | 30.12 | 70.00 | 18.00 | 35.50 | 31.00 | 69.00 | 19.00 |\n"
        "| Min-max entropy, 4 erasing passes | 0 | 10.00 | 50.00 | 60.00 | 33.00 | 40.00 | 52.00 "
        "| 61.00 | 35.00 |\n"
    )
    assert markdown.read_text() == expected
    assert capsys.readouterr().out == expected
    lines = latex.read_text().splitlines()
    assert r"CAM & 0 & 5.00 & 30.12 & 70.00 & 18.00 & 35.50 & 31.00 & 69.00 & 19.00 \\" in lines
    assert lines[0] == r"\begin{table}[t]" and lines[-1] == r"\end{table}"


def test_seeds_of_one_setting_give_mean_and_sample_std(tmp_path):
    folders = [
        fake_run(tmp_path, f"cam{seed}", "cam", seed, metrics(seed * 2.0, 40 + seed, 60, 30 - seed))
        for seed in (2, 0, 1)
    ]
    settings = report.group_runs([report.read_run(folder, "test") for folder in folders])
    assert len(settings) == 1 and settings[0].seeds == [0, 1, 2]
    text = report.markdown_tables(settings, "test")
    assert "| CAM | 0,1,2 | 2.00 ± 2.00 | 41.00 ± 1.00 | 60.00 ± 0.00 | 29.00 ± 1.00 |" in text
    assert "CRF" not in text
    assert "$2.00 \\pm 2.00$" in report.latex_tables(settings, "test")


def test_rows_follow_the_paper_order_and_same_labels_are_told_apart(tmp_path):
    runs = [
        fake_run(tmp_path, "e4", "minmax", 0, metrics(1, 1, 1, 1), erase=4),
        fake_run(tmp_path, "e0", "minmax", 0, metrics(1, 1, 1, 1)),
        fake_run(tmp_path, "ones", "allones", 0, metrics(1, 1, 0, 1)),
        fake_run(tmp_path, "wild", "wildcat", 0, metrics(1, 1, 1, 1)),
        fake_run(tmp_path, "gc", "gradcam", 0, metrics(1, 1, 1, 1)),
        fake_run(tmp_path, "gc-nocrf", "gradcam", 0, metrics(1, 1, 1, 1), crf=False),
    ]
    settings = report.group_runs([report.read_run(folder, "test") for folder in runs])
    assert [setting.label for setting in settings] == [
        "All-ones",
        "Grad-CAM [crf=False]",
        "Grad-CAM [crf=True]",
        "WILDCAT",
        "Min-max entropy, no erasing",
        "Min-max entropy, 4 erasing passes",
    ]


def test_missing_metric_and_bad_folder(tmp_path, capsys):
    folder = fake_run(tmp_path, "cam", "cam", 0, metrics(1, 2, 3, 4))
    other = fake_run(tmp_path, "ours", "minmax", 0, metrics(1, 2, 3, 4, crf=(5, 6)))
    settings = report.group_runs([report.read_run(path, "test") for path in (folder, other)])
    assert "| CAM | 0 | 1.00 | 2.00 | 3.00 | 4.00 | – | – |" in report.markdown_tables(
        settings, "test"
    )
    assert report.main([str(tmp_path / "nowhere")]) == 1
    assert "nowhere: config.yaml not found" in capsys.readouterr().err
    assert report.main([str(folder), "--split", "valid"]) == 1
    assert "no 'valid' metrics" in capsys.readouterr().err


def test_a_parent_folder_stands_for_the_finished_runs_inside_it(tmp_path, capsys):
    exps = tmp_path / "exps"
    (exps / "seed1").mkdir(parents=True)
    runs = [
        fake_run(exps, "cam0", "cam", 0, metrics(2, 40, 60, 30)),
        fake_run(exps / "seed1", "cam1", "cam", 1, metrics(4, 42, 60, 28)),
    ]
    (exps / "unfinished").mkdir()
    (exps / "unfinished" / "config.yaml").write_text("MYSEED: 5\n")
    assert report.experiment_folders([exps]) == runs
    assert report.main([str(exps)]) == 0
    assert "| CAM | 0,1 | 3.00 ± 1.41 | 41.00 ± 1.41 | 60.00 ± 0.00 | 29.00 ± 1.41 |" in (
        capsys.readouterr().out
    )
    assert report.main([str(exps / "unfinished")]) == 1
    assert "final_metrics.json not found" in capsys.readouterr().err
    assert report.main([str(tmp_path / "empty")]) == 1
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 1
    assert "no finished experiment (config.yaml and final_metrics.json) inside" in (
        capsys.readouterr().err
    )


def test_figure_uses_the_same_images_for_every_method(tmp_path):
    folders = [
        fake_run(tmp_path, "cam", "cam", 0, metrics(1, 2, 3, 4)),
        fake_run(tmp_path, "ours", "minmax", 0, metrics(1, 2, 3, 4)),
    ]
    figure = tmp_path / "figure.png"
    assert report.main([*map(str, folders), "--figure", str(figure), "--images", "1"]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    odd = fake_run(tmp_path, "wild", "wildcat", 0, metrics(1, 2, 3, 4), indices=(4, 5))
    settings = report.group_runs([report.read_run(path, "test") for path in (*folders, odd)])
    with pytest.raises(report.ReportError, match="differ from"):
        report.comparison_figure(settings, figure, 2)


def test_prediction_samples_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        {
            "index": index,
            "caption": f"image {index}",
            "image": rng.integers(0, 255, (8, 6, 3), dtype=np.uint8),
            "gt_mask": (rng.random((8, 6)) > 0.5).astype(np.uint8),
            "pred_mask": rng.random((8, 6)).astype(np.float32),
        }
        for index in (3, 5)
    ]
    samples[1]["crf_mask"] = rng.random((8, 6)).astype(np.float32)
    save_prediction_samples(samples, tmp_path / "samples.npz")
    loaded = load_prediction_samples(tmp_path / "samples.npz")
    assert [sorted(sample) for sample in loaded] == [sorted(sample) for sample in samples]
    for original, restored in zip(samples, loaded):
        assert (restored["index"], restored["caption"]) == (original["index"], original["caption"])
        for name in ("image", "gt_mask", "pred_mask", "crf_mask"):
            if name in original:
                assert restored[name].dtype == original[name].dtype
                np.testing.assert_array_equal(restored[name], original[name])


def test_compare_starts_resumes_and_reuses_runs(tmp_path):
    folder = tmp_path / compare.run_name("cam", 1)
    assert folder.name == "cam-seed1"
    start = compare.train_command("synthetic-cam.yaml", folder, ["--data-root", "d"])
    assert start[:2] == ["--yaml", "synthetic-cam.yaml"] and "--crf" in start
    assert start[start.index("--exp-name") + 1] == "cam-seed1" and start[-2:] == [
        "--data-root",
        "d",
    ]
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"")
    assert compare.train_command("synthetic-cam.yaml", folder, []) == [
        "--resume",
        str(folder),
        "--quiet",
    ]
    (folder / "final_metrics.json").write_text("{}")
    assert compare.run_setting("cam", "synthetic-cam.yaml", 1, tmp_path, []) == folder


@pytest.mark.parametrize("protocol", sorted(compare.PROTOCOLS))
def test_every_setting_of_a_comparison_names_a_shipped_config(protocol):
    settings = compare.TRAINED + compare.POST_HOC
    names = [compare.config_name(protocol, config) for _, config in settings]
    assert set(names) <= set(available_configs()) and len(set(names)) == 6
    methods = {load_config(resolve_yaml_path(name))["method"] for name in names}
    assert methods == set(METHOD_NAMES)


def test_compare_writes_into_its_runs_folder_unless_told(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_setting", lambda setting, *rest: tmp_path / setting)
    monkeypatch.setattr(
        compare.subprocess,
        "run",
        lambda command, **_: calls.append(command) or SimpleNamespace(returncode=0),
    )
    monkeypatch.chdir(tmp_path)
    assert compare.main(["--seeds", "0"]) == 0
    root = tmp_path / "exps" / "compare" / "transfer"
    assert calls[-1][calls[-1].index("--markdown") + 1] == str(
        root / "synthetic-transfer-comparison.md"
    )
    compare.main(["--protocol", "scratch", "--seeds", "0", "--out", "doc"])
    assert calls[-1][calls[-1].index("--figure") + 1] == str(
        tmp_path / "doc" / "synthetic-comparison.png"
    )


def test_latex_labels_are_escaped():
    assert report.latex_text(r"a_b [x=50%] & {c}") == r"a\_b [x=50\%] \& \{c\}"


def test_comparison_figure_needs_one_map_per_image(tmp_path):
    image, truth = np.zeros((8, 8, 3), dtype=np.uint8), np.eye(8)
    with pytest.raises(ValueError, match="CAM has 0 maps for 1 images"):
        plots.save_method_comparison([image], [truth], [("CAM", [])], tmp_path / "f.png")
    with pytest.raises(ValueError, match="no image"):
        plots.save_method_comparison([], [], [], tmp_path / "f.png")


def test_curves_figure_averages_the_trained_settings_and_needs_one_history(tmp_path, capsys):
    trained = [
        fake_run(tmp_path, f"ours{seed}", "minmax", seed, metrics(1, 2, 3, 4)) for seed in (0, 1)
    ]
    post_hoc = fake_run(tmp_path, "ones", "allones", 0, metrics(1, 2, 3, 4))
    for seed, folder in enumerate(trained):
        epochs = [
            {
                "epoch": e,
                "valid_f1_neg": 50 + e + seed,
                "valid_mask_area": 30.0,
                "valid_truth_area": 25.0,
                "train_loss_pos": 1.0 / (e + 1),
            }
            for e in range(3 + seed)
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    path = tmp_path / "curves.png"
    args = [*map(str, trained + [post_hoc]), "--curves", str(path)]
    assert report.main(args) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"curves: {path}" in capsys.readouterr().out
    assert report.main([str(post_hoc), "--curves", str(tmp_path / "none.png")]) == 1
    assert "no run has a metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "none.png").exists()


def test_curves_of_runs_of_unequal_length_are_padded_with_gaps():
    stacked = plots._stacked([np.array([1.0, 2.0]), np.array([3.0])])
    np.testing.assert_array_equal(stacked, [[1.0, 2.0], [3.0, np.nan]])
    assert np.nanmean(stacked, axis=0).tolist() == [2.0, 2.0]


def test_a_setting_keeps_its_colour_on_every_panel():
    """Symptom: a panel that lacked the first setting drew the second in the first's colour."""
    baseline = [[{"epoch": e, "train_loss_cl": 1.0, "valid_f1_neg": 50.0} for e in range(3)]]
    ours = [[{"epoch": e, "train_loss_pos": 1.0, "valid_f1_neg": 60.0} for e in range(3)]]
    panels = [("valid_f1_neg", "F1-"), ("train_loss_cl", "L_cl"), ("train_loss_pos", "L_pos")]
    figure = plots.comparison_curves_figure({"CAM": baseline, "ours": ours}, panels)
    colours = {}
    for ax in figure.axes:
        for line in ax.lines:
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert len(colours["CAM"]) == len(colours["ours"]) == 1
    assert colours["CAM"] != colours["ours"]
    assert [line.get_label() for line in figure.axes[2].lines] == ["ours"]
