"""The cost projection of the paper tables: hand-computed cases from both report formats."""

import json

import pytest

from deepmil import cost


def gpucheck_report(path):
    """A gpucheck JSON: fp32 batch 8 steps of 1 s / 2 s, batch 4 of 0.6 s / 1.2 s, 10 img/s."""
    rows = [
        {"amp": "fp32", "batch": 8, "channels_last": False, "compile": None,
         "step_no_erasing_s": 1.0, "step_erasing_s": 2.0, "peak_mb": 4096.0},
        {"amp": "fp32", "batch": 8, "channels_last": True, "compile": None,
         "step_no_erasing_s": 0.1, "step_erasing_s": 0.1, "peak_mb": 1.0},
        {"amp": "bf16", "batch": 8, "channels_last": False, "compile": None,
         "step_no_erasing_s": 0.1, "step_erasing_s": 0.1, "peak_mb": 1.0},
        {"amp": "fp32", "batch": 4, "channels_last": False, "compile": None,
         "step_no_erasing_s": 0.6, "step_erasing_s": 1.2, "peak_mb": 1.0},
    ]  # fmt: skip
    report = {
        "setting": "a GPU",
        "device": "cuda",
        "step": {"rows": rows},
        "eval": {"rows": [{"amp": "fp32", "batch_1_img_s": 10.0}]},
    }
    path.write_text(json.dumps(report))
    return path


def test_glas_with_erasing_from_a_gpucheck_report(tmp_path):
    measured = cost.read_measured(gpucheck_report(tmp_path / "g.json"), None)
    assert (measured.batch, measured.plain_s, measured.erasing_s) == (8, 1.0, 2.0)
    assert measured.eval_s == pytest.approx(0.1) and measured.peak_mb == 4096.0
    one = cost.config_cost("glas", "4-erasing", measured, 1, crf_workers=8)
    # 67 images, batch 8: 9 steps; 400 epochs, erasing from epoch 1: 1 plain + 399 erasing.
    training = 9 * (1 * 1.0 + 399 * 2.0)
    validation = 400 * 18 * 0.1
    final = (18 + 80 + 67) * 0.1
    assert one["steps"] == 3600 and one["measured_step"]
    assert one["total_s"] == pytest.approx(training + validation + final)
    assert one["epoch_s"] == pytest.approx(9 * 2.0 + 18 * 0.1)
    assert one["crf_s"] is None
    two = cost.config_cost("glas", "4-erasing", measured, 2, crf_workers=8)
    assert two["measured_step"]  # batch 4 per GPU was measured
    expected = 9 * (0.6 + 399 * 1.2) + validation / 2 + final / 2
    assert two["total_s"] == pytest.approx(expected)
    four = cost.config_cost("glas", "no-erasing", measured, 4, crf_workers=8)
    assert not four["measured_step"]  # batch 2 was not: the batch-8 step divided by 4
    assert four["total_s"] == pytest.approx(9 * 400 * 0.25 + validation / 4 + final / 4)
    table = cost.cost_table(measured, [1, 4], crf_workers=8)
    assert "| epoch (1 GPU) |" in table and "| total, 4 GPUs |" in table


def test_cub_from_a_bench_report_with_the_crf(tmp_path):
    report = {
        "setting": "CPU",
        "device": "cpu",
        "step": {
            "step_no_erasing_s": 20.0,
            "step_4_erasing_s": 50.0,
            "consumed_no_erasing_img_s": 0.4,
            "peak_rss_mb": 9000.0,
        },
        "eval": {"eval_forward_s": 2.0},
        "crf": {"480_wrapper_ms": 400.0},
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    measured = cost.read_measured(path, None)
    assert (measured.batch, measured.erasing_s, measured.crf_s) == (8, 50.0, 0.4)
    row = cost.config_cost("cuball", "no-erasing", measured, 1, crf_workers=8)
    steps = 600  # ceil(4794 / 8)
    expected = steps * 400 * 20.0 + 400 * 1200 * 2.0 + (1200 + 5794 + 4794) * 2.0 + 5794 * 0.4 / 8
    assert row["total_s"] == pytest.approx(expected)
    assert row["crf_s"] == pytest.approx(5794 * 0.4 / 8)
    table = cost.cost_table(measured, [1, 2], crf_workers=8)
    assert (
        table.count("\n") == 2 + 8
        and "| cuball-no-erasing | 4794 / 1200 / 5794 | 240000 |" in table
    )
    assert "(ideal)" in table
    assert "| epoch (1 machine) |" in table and "| total, 2 machines |" in table


def test_the_disk_column_counts_the_download_and_three_parameter_copies():
    assert cost.disk_mb("glas", "no-erasing") is None
    megabytes = cost.disk_mb("cub5", "4-erasing")
    resnet101_head = 3 * 4 * 42.5e6 / 1e6  # about 42.5 M parameters in float32, three copies
    assert megabytes == pytest.approx(1174 + resnet101_head, rel=0.02)


def test_unusable_figures_are_refused_with_the_file_named(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("{}")
    with pytest.raises(cost.CostError, match="empty.json: no usable step and eval figures"):
        cost.read_measured(path, None)
    with pytest.raises(cost.CostError, match="missing.json: cannot read"):
        cost.read_measured(tmp_path / "missing.json", None)
    with pytest.raises(cost.CostError, match="no 480-px CRF figure"):
        cost.read_measured(gpucheck_report(tmp_path / "g.json"), path)
