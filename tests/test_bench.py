"""Smoke test of the benchmark entry point on tiny settings (no timing assertions)."""

import json

import numpy as np
import pytest

import crf_params
from deepmil import bench
from deepmil.config import ConfigError
from tools import CRF

EXPECTED = {
    "step": [
        "trunk_fwd_bwd_s",
        "localizer_fwd_bwd_s",
        "regions_fwd_bwd_s",
        "step_no_erasing_s",
        "step_2_erasing_s",
        "erasing_passes_run",
        "ratio_no_erasing",
        "ratio_2_erasing",
        "ratio_no_erasing_vs_passes",
        "ratio_erasing_vs_passes",
        "consumed_no_erasing_img_s",
        "consumed_erasing_img_s",
        "peak_rss_mb",
    ],
    "eval": [
        "padded_height",
        "padded_width",
        "eval_forward_s",
        "trunk_forward_s",
        "eval_img_s",
        "ratio_eval_vs_trunk",
        "batched_eval_forward_s",
        "batched_eval_img_s",
        "ratio_batched_eval_per_image_vs_trunk",
        "peak_rss_mb",
    ],
    "loader": [
        "images",
        "workers_0_preload_off_img_s",
        "workers_1_preload_off_img_s",
        "workers_0_preload_on_img_s",
        "workers_1_preload_on_img_s",
        "training_consumes_img_s",
        "ratio_workers_1_preload_off_vs_training",
        "ratio_workers_1_preload_on_vs_training",
        "peak_rss_mb",
    ],
    "crf": [
        "48_raw_ms",
        "48_wrapper_ms",
        "48_pool_2_ms",
        "48_ratio_wrapper_vs_raw",
        "48_pool_speedup",
        "peak_rss_mb",
    ],
}


def test_bench_writes_every_section(tmp_path, capsys):
    path = tmp_path / "bench.json"
    report = bench.main(
        [
            "--device",
            "cpu",
            "--size",
            "64",
            "--batch",
            "2",
            "--erase",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--loader-images",
            "8",
            "--loader-workers",
            "0,1",
            "--crf-sizes",
            "48",
            "--crf-images",
            "2",
            "--json",
            str(path),
        ]
    )
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(report))
    assert written["setting"].startswith("synthetic-no-erasing.yaml: resnet18, batch 2, 64x64, cpu")
    for section, keys in EXPECTED.items():
        assert sorted(written[section]) == sorted(keys), section
        for key in keys:
            assert written[section][key] > 0, (section, key)
    assert 1 <= written["step"]["erasing_passes_run"] <= 2
    assert written["eval"]["padded_height"] == written["eval"]["padded_width"] == 64
    assert written["step"]["consumed_no_erasing_img_s"] == 2 / written["step"]["step_no_erasing_s"]
    out = capsys.readouterr().out
    assert f"figures (seconds, images/s, MiB, ratios) written to {path}" in out
    shown = f"{written['eval']['ratio_eval_vs_trunk']:12.2f} x"
    assert f"  {'ratio eval vs trunk':<48} {shown}" in out.splitlines()


def test_figures_are_printed_with_their_units():
    assert bench.readable("step_no_erasing_s", 0.0125) == ("step no erasing", "       12.50 ms")
    assert bench.readable("trunk_fwd_bwd_s", 2.0)[0] == "trunk forward+backward"
    assert bench.readable("480_raw_ms", 3.456) == ("480 raw", "        3.46 ms")
    assert bench.readable("eval_img_s", 40.04) == ("eval", "        40.0 images/s")
    assert bench.readable("peak_rss_mb", 1500.4) == ("peak rss", "        1500 MiB")
    assert bench.readable("48_pool_speedup", 1.5) == ("48 pool speedup", "        1.50 x")
    assert bench.readable("padded_height", 64.0) == ("padded height", "          64")


def test_sections_can_be_selected(tmp_path):
    report = bench.main(
        [
            "--device",
            "cpu",
            "--sections",
            "crf",
            "--crf-sizes",
            "32",
            "--crf-images",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            str(tmp_path / "bench.json"),
        ]
    )
    assert sorted(report) == ["crf", "device", "setting"] and report["device"] == "cpu"
    assert sorted(report["crf"]) == sorted(key.replace("48", "32") for key in EXPECTED["crf"])


def test_unknown_section_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "step,train"])
    assert "unknown sections ['train']" in capsys.readouterr().err


def test_raw_densecrf_does_the_work_of_the_wrapper():
    ((image, mask),) = bench.crf_inputs(32, 1)
    crf = CRF(crf_params.CUB)
    raw = bench.raw_densecrf(
        image, bench.unary_energy(mask), crf.params, crf.GAUSSIAN_COMPAT, crf.BILATERAL_COMPAT
    )
    refined = crf(image, mask)
    np.testing.assert_allclose(raw.reshape(2, 32, 32)[1], refined, atol=1e-6)
    assert np.abs(refined - mask).max() > 0.01  # the CRF did change the map


def test_the_setting_comes_from_the_config_and_flags_override_it():
    args = bench.apply_config(
        bench.parse_args(
            [
                "--yaml",
                "glas-4-erasing.yaml",
                "--model",
                "resnet18",
                "--size",
                "64",
                "--amp",
                "bf16",
            ]
        )
    )
    assert (args.model, args.classes, args.batch, args.size) == ("resnet18", 2, 8, 64)
    assert (args.kmax, args.dropout, args.erase, args.sigma_erase) == (0.09, 0.75, 4, 10.0)
    assert (args.amp, args.channels_last, args.compile) == ("bf16", False, None)
    model = args.config["model"]
    assert (model["name"], model["kmin"], model["modalities"], model["pretrained"]) == (
        "resnet18",
        0.09,
        5,
        False,
    )
    assert args.config["optimizer"]["weight_decay"] == 1e-5
    network = bench.build_net(args, bench.torch.device("cpu"))
    assert network.cl32.wildcat.kmax == 0.09 and network.scale == (0.5, 0.5)


def test_the_default_setting_is_the_synthetic_config():
    args = bench.apply_config(bench.parse_args(["--kmax", "0.25", "--erase", "2"]))
    assert (args.yaml, args.model, args.classes, args.batch, args.size) == (
        "synthetic-no-erasing.yaml",
        "resnet18",
        2,
        8,
        128,
    )
    assert (args.config["model"]["kmax"], args.config["model"]["kmin"], args.erase) == (
        0.25,
        0.25,
        2,
    )
    assert bench.apply_config(bench.parse_args([])).erase == bench.DEFAULT_ERASING_PASSES


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": "cam"}, "measures the min-max entropy model"),
        ({"crop_size": [96, 64]}, "is not square; give the benchmark's image side with --size"),
    ],
)
def test_configs_the_benchmark_cannot_take(tmp_path, changes, message):
    path = tmp_path / "x.yaml"
    path.write_text(json.dumps({"base": "synthetic-no-erasing.yaml", **changes}))
    with pytest.raises(ConfigError, match=message):
        bench.apply_config(bench.parse_args(["--yaml", str(path)]))
