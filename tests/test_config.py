"""Configuration: shipped files, schema errors, command-line overrides, seed and data root."""

import logging
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tools
from deepmil.cli import EPILOG, FLAG_KEYS, build_parser, resolve_seed
from deepmil.config import (
    CONFIG_DIR,
    IGNORED_KEYS,
    RUN_OPTIONS,
    ConfigError,
    apply_overrides,
    available_configs,
    load_config,
    parse_yaml,
    resolve_yaml_path,
    save_config,
    validate_config,
)
from deepmil.pooling import get_k
from deepmil.registry import METHOD_NAMES, feature_map_size
from helpers import REPO

PAPER_CONFIGS = [
    f"{name}-{tag}.yaml"
    for name in ("glas", "cub5", "cuball", "oxford-flowers")
    for tag in ("no-erasing", "4-erasing")
]
SYNTHETIC_CONFIGS = [
    f"{prefix}-{setting}.yaml"
    for prefix in ("synthetic", "synthetic-transfer")
    for setting in ("no-erasing", "4-erasing")
]
BASELINES = ("cam", "wildcat", "gradcam", "allones")
DATASET_PREFIXES = ("glas", "cub5", "cuball", "oxford-flowers", "synthetic", "synthetic-transfer")
BASELINE_CONFIGS = [
    f"{prefix}-{method}.yaml" for prefix in DATASET_PREFIXES for method in BASELINES
]
OWN_DATA_CONFIGS = ["folder.yaml"]
README_COMMAND = (
    "--cudaid 1 --yaml glas-no-erase.yaml --kmin 0.09 --kmax 0.09 --dout 0.0 "
    "--epoch 2 --nbrerase 0 --epocherase 1 --stepsize 40 --bsize 8 --modalities 5 "
    "--lr 0.001 --fold 0 --wdecay 1e-05 --alpha 0.2"
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    monkeypatch.delenv("MYSEED", raising=False)
    monkeypatch.delenv("DEEPMIL_DATA_ROOT", raising=False)


def raw_config(name: str) -> dict:
    return parse_yaml((CONFIG_DIR / name).read_text())


def write_config(tmp_path, data: dict, name: str = "x.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


# ----------------------------------------------------------------------------- shipped files


def test_shipped_config_set():
    assert available_configs() == sorted(
        PAPER_CONFIGS + SYNTHETIC_CONFIGS + BASELINE_CONFIGS + OWN_DATA_CONFIGS
    )


@pytest.mark.parametrize(
    "name", PAPER_CONFIGS + SYNTHETIC_CONFIGS + BASELINE_CONFIGS + OWN_DATA_CONFIGS
)
def test_every_config_loads(name):
    config = load_config(resolve_yaml_path(name))
    assert config["nbr_classes"] == config["model"]["num_classes"]
    assert isinstance(config["crop_size"], list) and isinstance(config["model"]["scale"], list)


COMMON_VALUES = {
    "MYSEED": 0,
    "split": 0,
    "fold": 0,
    "fold_folder": "./folds",
    "resize": None,
    "crop_size": [480, 480],
    "pad_eval": False,
    "padding_mode": "reflect",
    "batch_size": 8,
    "num_workers": 8,
    "amp": None,
    "channels_last": False,
    "max_epochs": 400,
    "epoch_start_erasing": 1,
    "sigma_erase": 10,
    "alpha": 128,
    "height_tag": 50,
    "bins": 100,
    "rangeh": [0, 1],
    "extension": ["jpeg", "JPEG"],
    "model.name": "resnet101",
    "model.pretrained": True,
    "model.num_masks": 1,
    "model.scale": [0.5, 0.5],
    "model.modalities": 5,
    "model.kmax": 0.09,
    "model.kmin": 0.09,
    "model.alpha": 0.0,
    "model.sigma": 0.5,
    "model.w": 8,
    "optimizer.name": "sgd",
    "optimizer.lr": 0.001,
    "optimizer.momentum": 0.9,
    "optimizer.nesterov": True,
    "optimizer.dampening": 0.0,
    "optimizer.weight_decay": 1e-5,
    "optimizer.lr_scheduler.name": "mystep",
    "optimizer.lr_scheduler.step_size": 40,
    "optimizer.lr_scheduler.gamma": 0.1,
    "optimizer.lr_scheduler.min_lr": 1e-7,
    "optimizer.lr_scheduler.last_epoch": -1,
}
DATASET_VALUES = {
    "glas": {
        "dataset": "glas",
        "fold_name": None,
        "img_extension": "bmp",
        "name_classes": {"benign": 0, "malignant": 1},
        "nbr_classes": 2,
        "model.num_classes": 2,
        "up_scale_small_dim_to": None,
        "padding_size": [0.5, 0.5],
        "model.dropout": 0.75,
        "path_pre_trained": None,
    },
    "cub5": {
        "dataset": "Caltech-UCSD-Birds-200-2011",
        "fold_name": "Caltech-UCSD-Birds-200-2011-CUB5",
        "img_extension": "bmp",
        "name_classes": "encoding.yaml",
        "nbr_classes": 5,
        "model.num_classes": 5,
        "up_scale_small_dim_to": 500,
        "padding_size": None,
        "model.dropout": 0.85,
        "path_pre_trained": None,
    },
    "cuball": {
        "dataset": "Caltech-UCSD-Birds-200-2011",
        "fold_name": None,
        "img_extension": "bmp",
        "name_classes": "encoding.yaml",
        "nbr_classes": 200,
        "model.num_classes": 200,
        "up_scale_small_dim_to": 500,
        "padding_size": None,
        "model.dropout": 0.85,
        "path_pre_trained": None,
    },
    "oxford-flowers": {
        "dataset": "Oxford-flowers-102",
        "fold_name": None,
        "img_extension": "jpg",
        "name_classes": "encoding.yaml",
        "nbr_classes": 102,
        "model.num_classes": 102,
        "up_scale_small_dim_to": 500,
        "padding_size": None,
        "model.dropout": 0.85,
        "path_pre_trained": None,
    },
}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_values(name):
    config = load_config(resolve_yaml_path(name))
    prefix = name.rsplit("-", 2)[0]
    expected = {
        **COMMON_VALUES,
        **DATASET_VALUES[prefix],
        "nbr_times_erase": 0 if "no-erasing" in name else 4,
    }
    for key, value in expected.items():
        assert get(config, key) == value, key


def test_upstream_keys_are_accepted_and_ignored_without_warnings(caplog):
    raw = raw_config("glas-no-erasing.yaml")
    assert raw["show_hists"] is True and raw["floating"] == 3
    with caplog.at_level(logging.WARNING, logger="deepmil.config"):
        config = load_config(CONFIG_DIR / "glas-no-erasing.yaml")
    assert config["show_hists"] is True and config["floating"] == 3
    assert caplog.text == ""
    assert IGNORED_KEYS == (
        "img_extension",
        "erase_in_inference",
        "normalize",
        "alpha",
        "floating",
        "height_tag",
        "use_tags",
        "show_hists",
        "bins",
        "rangeh",
        "extension",
        "model.num_masks",
        "model.smooth_out",
        "optimizer.lr_scheduler.last_epoch",
    )
    with pytest.raises(ConfigError, match="show_hists = 'yes' has the wrong type"):
        validate_config({**raw, "show_hists": "yes"}, "test")


def test_unsupported_upstream_options_are_refused_by_the_schema():
    raw = raw_config("synthetic-no-erasing.yaml")
    with pytest.raises(
        ConfigError, match=r"resize = 100 is not an allowed value \(expected one of null\)"
    ):
        validate_config({**raw, "resize": 100}, "test")
    with pytest.raises(ConfigError, match=r"pad_eval = true is not an allowed value"):
        validate_config({**raw, "pad_eval": True}, "test")
    with pytest.raises(ConfigError, match="max_epochs = -1 evaluates a trained model"):
        validate_config({**raw, "max_epochs": -1}, "test")
    assert (
        validate_config({**raw, "max_epochs": -1, "path_pre_trained": "w.pt"}, "test")["max_epochs"]
        == -1
    )


def test_run_options_are_flagged_in_the_schema():
    assert {"MYSEED", "num_workers", "cudaid", "model.pretrained_cache"} <= set(RUN_OPTIONS)
    assert not {"method", "nbr_times_erase", "model.kmax"} & set(RUN_OPTIONS)
    assert not set(RUN_OPTIONS) & set(IGNORED_KEYS)


def test_validating_a_config_does_not_import_torch():
    code = (
        "import sys, deepmil.config as c; "
        "c.load_config(c.resolve_yaml_path('glas-4-erasing.yaml')); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("prefix", DATASET_PREFIXES)
def test_erasing_pairs_differ_only_in_nbr_times_erase(prefix):
    plain = load_config(CONFIG_DIR / f"{prefix}-no-erasing.yaml")
    erasing = load_config(CONFIG_DIR / f"{prefix}-4-erasing.yaml")
    assert (plain["nbr_times_erase"], erasing["nbr_times_erase"]) == (0, 4)
    assert without(plain, "nbr_times_erase") == without(erasing, "nbr_times_erase")
    assert raw_config(f"{prefix}-4-erasing.yaml") == {
        "base": f"{prefix}-no-erasing.yaml",
        "nbr_times_erase": 4,
    }


@pytest.mark.parametrize("name", BASELINE_CONFIGS)
def test_baseline_configs_are_the_no_erasing_settings_with_their_method(name):
    prefix, method = name[: -len(".yaml")].rsplit("-", 1)
    config = load_config(CONFIG_DIR / name)
    reference = load_config(CONFIG_DIR / f"{prefix}-no-erasing.yaml")
    assert config["method"] == method and reference["method"] == "minmax"
    assert without(config, "method") == without(reference, "method")


def test_base_file_is_merged_section_by_section(tmp_path):
    write_config(
        tmp_path, {**raw_config("synthetic-no-erasing.yaml"), "max_epochs": 7}, "parent.yaml"
    )
    child = write_config(
        tmp_path,
        {"base": "parent.yaml", "method": "cam", "model": {"kmax": 1.0}, "optimizer": {"lr": 0.5}},
    )
    config = load_config(child)
    assert (config["method"], config["max_epochs"]) == ("cam", 7)
    assert config["model"]["kmax"] == 1.0 and config["model"]["kmin"] == 0.5
    assert config["optimizer"]["lr"] == 0.5 and config["optimizer"]["momentum"] == 0.9


def test_base_falls_back_to_shipped_configs_and_refuses_cycles(tmp_path):
    shipped = write_config(tmp_path, {"base": "glas-no-erasing.yaml", "method": "wildcat"})
    assert load_config(shipped)["dataset"] == "glas"
    write_config(tmp_path, {"base": "b.yaml"}, "a.yaml")
    write_config(tmp_path, {"base": "a.yaml"}, "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    missing = write_config(tmp_path, {"base": "nowhere.yaml"}, "c.yaml")
    with pytest.raises(ConfigError, match="'nowhere.yaml' not found"):
        load_config(missing)


def test_baselines_refuse_erasing(tmp_path):
    path = write_config(tmp_path, {"base": "synthetic-4-erasing.yaml", "method": "cam"})
    with pytest.raises(ConfigError, match="nbr_times_erase = 4 is out of range for method 'cam'"):
        load_config(path)


def test_errors_name_the_file_and_its_base_files(tmp_path):
    write_config(
        tmp_path, {**raw_config("synthetic-no-erasing.yaml"), "batch_size": 0}, "parent.yaml"
    )
    write_config(tmp_path, {"base": "parent.yaml", "max_epochs": 3}, "middle.yaml")
    child = write_config(tmp_path, {"base": "middle.yaml", "method": "cam"})
    with pytest.raises(ConfigError) as info:
        load_config(child)
    message = str(info.value)
    assert message.startswith(
        f"{child} (over base {tmp_path / 'middle.yaml'}, "
        f"{tmp_path / 'parent.yaml'}): batch_size = 0"
    )
    with pytest.raises(ConfigError, match="method"):
        tools.get_yaml_args(["--yaml", "synthetic-no-erasing.yaml", "--method", "gradcampp"])


def test_synthetic_values():
    config = load_config(CONFIG_DIR / "synthetic-no-erasing.yaml")
    assert config["synthetic"] == {
        "num_classes": 2,
        "image_size": 128,
        "n_train": 240,
        "n_test": 100,
        "seed": 0,
        "min_objects": 1,
        "max_objects": 4,
    }
    assert config["crop_size"] == [128, 128] and config["padding_size"] == [0.5, 0.5]
    assert (config["batch_size"], config["num_workers"], config["max_epochs"]) == (8, 2, 20)
    assert config["epoch_start_erasing"] == 10
    assert config["model"]["name"] == "resnet18" and config["model"]["pretrained"] is False
    assert (config["model"]["kmax"], config["model"]["dropout"]) == (0.5, 0.0)
    assert (config["optimizer"]["lr"], config["optimizer"]["weight_decay"]) == (0.01, 1e-5)
    assert config["nbr_classes"] == config["synthetic"]["num_classes"] == 2


# ----------------------------------------------------------------------------- schema errors


def glas_raw() -> dict:
    return raw_config("glas-no-erasing.yaml")


def error_of(tmp_path, data: dict) -> str:
    path = write_config(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_unknown_key_lists_close_and_allowed_keys(tmp_path):
    data = glas_raw()
    data["model"]["kmaxx"] = 0.1
    message = error_of(tmp_path, data)
    assert str(tmp_path / "x.yaml") in message
    assert "unknown key model.kmaxx" in message
    assert "did you mean model.kmax" in message
    assert "allowed keys in model:" in message and "dropout" in message


def test_unknown_top_level_key(tmp_path):
    data = glas_raw()
    data["bsize"] = 4
    message = error_of(tmp_path, data)
    assert "unknown key bsize" in message and "allowed keys at the top level" in message


def test_wrong_type_message(tmp_path):
    data = glas_raw()
    data["batch_size"] = "eight"
    message = error_of(tmp_path, data)
    assert message == (
        f"{tmp_path / 'x.yaml'}: batch_size = 'eight' has the wrong type (expected an integer >= 1)"
    )


def test_bool_is_not_an_integer(tmp_path):
    data = glas_raw()
    data["max_epochs"] = True
    assert "max_epochs = true has the wrong type" in error_of(tmp_path, data)


def test_bad_bool_in_yaml(tmp_path):
    data = glas_raw()
    data["preload"] = "maybe"
    message = error_of(tmp_path, data)
    assert "preload = 'maybe' has the wrong type (expected true or false)" in message


def test_out_of_range_message(tmp_path):
    data = glas_raw()
    data["model"]["kmax"] = -1
    assert error_of(tmp_path, data) == (
        f"{tmp_path / 'x.yaml'}: model.kmax = -1 is out of range (expected a number > 0)"
    )


@pytest.mark.parametrize(
    "dotted, value, expected",
    [
        ("model.dropout", 1.0, "model.dropout = 1.0 is out of range (expected a number in [0, 1))"),
        ("max_epochs", -2, "max_epochs = -2 is out of range (expected an integer >= -1)"),
        ("nbr_times_erase", -1, "nbr_times_erase = -1 is out of range (expected an integer >= 0)"),
        (
            "crop_size",
            [480, 0],
            "crop_size = [480, 0] is out of range (expected a list [h, w], each an integer >= 1)",
        ),
        ("crop_size", 480, "crop_size = 480 has the wrong type"),
        ("model.num_masks", 2, "model.num_masks = 2 is not an allowed value (expected one of 1)"),
        (
            "model.name",
            "vgg16",
            "model.name = 'vgg16' is not an allowed value (expected one of 'resnet18'",
        ),
        ("optimizer.name", "rmsprop", "optimizer.name = 'rmsprop' is not an allowed value"),
        ("optimizer.lr_scheduler.name", "cosine", "optimizer.lr_scheduler.name = 'cosine' is not"),
        ("dataset", "imagenet", "dataset = 'imagenet' is not an allowed value"),
        (
            "amp",
            "fp32",
            "amp = 'fp32' is not an allowed value (expected one of null, 'bf16', 'fp16')",
        ),
        ("channels_last", 1, "channels_last = 1 has the wrong type (expected true or false)"),
    ],
)
def test_value_errors(tmp_path, dotted, value, expected):
    data = glas_raw()
    *sections, leaf = dotted.split(".")
    target = data
    for part in sections:
        target = target[part]
    target[leaf] = value
    assert expected in error_of(tmp_path, data)


def test_missing_required_key(tmp_path):
    data = glas_raw()
    del data["nbr_classes"]
    assert "missing key nbr_classes" in error_of(tmp_path, data)


def test_class_count_checks(tmp_path):
    data = glas_raw()
    data["model"]["num_classes"] = 3
    assert "nbr_classes = 2 and model.num_classes = 3 differ" in error_of(tmp_path, data)
    data["nbr_classes"] = 3
    message = error_of(tmp_path, data)
    assert "nbr_classes = 3 is not allowed for dataset glas (expected 2)" in message
    cub = raw_config("cub5-no-erasing.yaml")
    cub["nbr_classes"] = cub["model"]["num_classes"] = 10
    assert "(expected 200 or 5)" in error_of(tmp_path, cub)
    synthetic = raw_config("synthetic-no-erasing.yaml")
    synthetic["synthetic"]["num_classes"] = 3
    assert "(expected synthetic.num_classes = 3)" in error_of(tmp_path, synthetic)


def test_yaml_exponent_float_and_tuple_free_lists(tmp_path):
    data = glas_raw()
    path = write_config(tmp_path, data)
    path.write_text(path.read_text().replace("weight_decay: 1.0e-05", "weight_decay: 1e-4"))
    assert load_config(path)["optimizer"]["weight_decay"] == 1e-4


def test_missing_yaml_names_tried_paths_and_available():
    with pytest.raises(ConfigError) as info:
        resolve_yaml_path("glas-nope.yaml")
    message = str(info.value)
    assert str(CONFIG_DIR / "glas-nope.yaml") in message
    assert "glas-no-erasing.yaml" in message and "synthetic-4-erasing.yaml" in message


def test_yaml_alias_and_path(tmp_path):
    assert resolve_yaml_path("glas-no-erase.yaml") == CONFIG_DIR / "glas-no-erasing.yaml"
    path = write_config(tmp_path, glas_raw())
    assert resolve_yaml_path(str(path)) == path


def test_wildcat_k_refusal(tmp_path):
    data = raw_config("synthetic-no-erasing.yaml")
    data["model"]["kmax"] = 0.09
    message = error_of(tmp_path, data)
    assert "model.kmax = 0.09" in message and "crop_size = [128, 128]" in message
    assert "model.scale = [0.5, 0.5]" in message and "64x64" in message and "2x2" in message
    assert "round(0.09 * 4) = 0" in message
    assert "[160, 160]" in message and "model.kmax > 0.125" in message
    data["crop_size"] = [160, 160]  # 80 -> 3x3 map: round(0.81) = 1
    assert load_config(write_config(tmp_path, data))["model"]["kmax"] == 0.09


def test_nesterov_needs_momentum(tmp_path):
    data = glas_raw()
    data["optimizer"]["momentum"] = 0.0
    assert "optimizer.nesterov = true needs optimizer.momentum > 0" in error_of(tmp_path, data)


def test_defaults_fill_omitted_keys(tmp_path):
    data = {
        "dataset": "glas",
        "name_classes": {"benign": 0, "malignant": 1},
        "nbr_classes": 2,
        "model": {"num_classes": 2},
    }
    config = load_config(write_config(tmp_path, data))
    assert config["optimizer"]["lr_scheduler"]["step_size"] == 40
    assert config["model"]["mask_normalization"] == "batch"
    assert config["model"]["apply_min_term"] is False and config["exact_eval_crop"] is False
    assert config["exp_root"] == "exps" and config["fold_name"] is None
    assert config["amp"] is None and config["channels_last"] is False


def test_gpu_flags_can_be_set_on_the_command_line():
    config = tools.get_yaml_args(
        ["--yaml", "synthetic-4-erasing.yaml", "--set", "amp=bf16", "--set", "channels_last=true"]
    )[0]
    assert config["amp"] == "bf16" and config["channels_last"] is True


# ----------------------------------------------------------------------------- command line


def test_readme_command_verbatim():
    config, args = tools.get_yaml_args(README_COMMAND.split())
    assert config["yaml"] == "glas-no-erase.yaml" and config["cudaid"] == "1"
    assert config["dataset"] == "glas" and config["model"]["alpha"] == 0.2
    assert config["max_epochs"] == 2 and config["model"]["dropout"] == 0.0
    assert config["strict"] is True


def readme_commands(marker: str) -> list[list[str]]:
    """The arguments of README's ``python train_deepmil.py`` commands that contain ``marker``
    (continuation lines joined)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return [
        shlex.split(line.split("python train_deepmil.py", 1)[1])
        for line in text.splitlines()
        if line.startswith("python train_deepmil.py") and marker in line
    ]


def test_readme_override_examples_are_valid_as_written():
    """Symptom: README's only override example stopped on the synthetic configuration."""
    (synthetic,) = readme_commands("synthetic-no-erasing.yaml --cudaid cpu --epoch 2")
    config, _ = tools.get_yaml_args(synthetic)
    assert config["dataset"] == "synthetic" and config["max_epochs"] == 2
    assert config["model"]["mask_normalization"] == "sample" and config["MYSEED"] == 3
    (paper,) = readme_commands("glas-no-erase.yaml --kmin 0.09")
    config, _ = tools.get_yaml_args(paper)
    assert config["dataset"] == "glas" and config["model"]["kmax"] == 0.09


def test_readme_command_maps_every_flag():
    argv = (
        "--cudaid 1 --yaml glas-no-erase.yaml --kmin 0.07 --kmax 0.08 --dout 0.1 --epoch 2 "
        "--nbrerase 3 --epocherase 5 --stepsize 30 --bsize 4 --modalities 6 --lr 0.002 "
        "--fold 1 --wdecay 2e-05 --alpha 0.2"
    ).split()
    config, _ = tools.get_yaml_args(argv)
    expected = {
        "model.kmin": 0.07,
        "model.kmax": 0.08,
        "model.dropout": 0.1,
        "max_epochs": 2,
        "nbr_times_erase": 3,
        "epoch_start_erasing": 5,
        "optimizer.lr_scheduler.step_size": 30,
        "batch_size": 4,
        "model.modalities": 6,
        "optimizer.lr": 0.002,
        "fold": 1,
        "optimizer.weight_decay": 2e-5,
        "model.alpha": 0.2,
        "cudaid": "1",
    }
    for key, value in expected.items():
        assert get(config, key) == value, key


# flag -> (dotted key of the original override table, command-line text, parsed value)
FLAG_CASES = {
    "method": ("method", "wildcat", "wildcat"),
    "bsize": ("batch_size", "3", 3),
    "lr": ("optimizer.lr", "0.5", 0.5),
    "momentum": ("optimizer.momentum", "0.5", 0.5),
    "wdecay": ("optimizer.weight_decay", "0.25", 0.25),
    "stepsize": ("optimizer.lr_scheduler.step_size", "7", 7),
    "epoch": ("max_epochs", "7", 7),
    "fold": ("fold", "2", 2),
    "split": ("split", "1", 1),
    "alpha": ("model.alpha", "0.3", 0.3),
    "kmax": ("model.kmax", "0.2", 0.2),
    "kmin": ("model.kmin", "0.3", 0.3),
    "dout": ("model.dropout", "0.4", 0.4),
    "modalities": ("model.modalities", "3", 3),
    "pretrained": ("model.pretrained", "No", False),
    "w": ("model.w", "4", 4.0),
    "modelname": ("model.name", "tv_resnet50", "tv_resnet50"),
    "nbrerase": ("nbr_times_erase", "2", 2),
    "epocherase": ("epoch_start_erasing", "3", 3),
    "path_pre_trained": ("path_pre_trained", "ckpt/best.pt", "ckpt/best.pt"),
    "strict": ("strict", "FALSE", False),
}


def test_flag_cases_cover_every_flag():
    assert set(FLAG_CASES) == set(FLAG_KEYS)


@pytest.mark.parametrize("flag", sorted(FLAG_CASES))
def test_each_flag_overrides_its_key(flag):
    dotted, text, value = FLAG_CASES[flag]
    before = load_config(CONFIG_DIR / "oxford-flowers-no-erasing.yaml")
    assert get(before, dotted) != value
    config, _ = tools.get_yaml_args(["--yaml", "oxford-flowers-no-erasing.yaml", f"--{flag}", text])
    assert get(config, dotted) == value
    for key in ("batch_size", "max_epochs", "fold", "model.kmin", "model.kmax"):
        if key != dotted:
            assert get(config, key) == get(before, key), key


def test_lam_is_not_offered():
    with pytest.raises(SystemExit):
        tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", "--lam", "0.5"])


def test_flags_are_not_abbreviated():
    with pytest.raises(SystemExit):
        tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", "--path", "x.pt"])


@pytest.mark.parametrize(
    "text, value",
    [("TRUE", True), ("yes", True), ("1", True), ("False", False), ("no", False), ("0", False)],
)
def test_bool_flags(text, value):
    config, _ = tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", "--pretrained", text])
    assert config["model"]["pretrained"] is value


@pytest.mark.parametrize(
    "flag, text",
    [("--pretrained", "maybe"), ("--strict", ""), ("--cudaid", "gpu0"), ("--bsize", "eight")],
)
def test_malformed_flag_is_an_argparse_error(flag, text, capsys):
    with pytest.raises(SystemExit) as info:
        tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", flag, text])
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


def test_flag_value_out_of_range_names_the_flag():
    with pytest.raises(ConfigError) as info:
        tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", "--dout", "1.5"])
    assert str(info.value) == (
        "command line (--dout): model.dropout = 1.5 is out of range (expected a number in [0, 1))"
    )


def test_strict_defaults_to_true_whatever_the_yaml(tmp_path):
    data = raw_config("oxford-flowers-no-erasing.yaml")
    data["strict"] = False
    path = write_config(tmp_path, data)
    config, _ = tools.get_yaml_args(["--yaml", str(path)])
    assert config["strict"] is True
    config, _ = tools.get_yaml_args(["--yaml", str(path), "--strict", "yes"])
    assert config["strict"] is True
    config, _ = tools.get_yaml_args(["--yaml", str(path), "--strict", "no"])
    assert config["strict"] is False


def test_set_nested_keys():
    config, _ = tools.get_yaml_args(
        [
            "--yaml",
            "glas-no-erasing.yaml",
            "--set",
            "optimizer.lr_scheduler.gamma=0.5",
            "--set",
            "model.sigma=0.25",
            "--set",
            "padding_size=null",
            "--set",
            "crop_size=[320, 256]",
            "--set",
            "model.mask_normalization=sample",
        ]
    )
    assert config["optimizer"]["lr_scheduler"]["gamma"] == 0.5
    assert config["model"]["sigma"] == 0.25 and config["padding_size"] is None
    assert config["crop_size"] == [320, 256] and config["model"]["mask_normalization"] == "sample"


def test_metrics_settings_default_and_override():
    from deepmil.metrics import MetricSettings

    config, _ = tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml"])
    assert config["metrics"] == {"empty_dice": "one", "cam_curve_interval": 0.001}
    assert MetricSettings.from_config(config["metrics"]) == MetricSettings(1.0, 0.001)
    config, _ = tools.get_yaml_args(
        [
            "--yaml",
            "glas-no-erasing.yaml",
            "--set",
            "metrics.empty_dice=zero",
            "--set",
            "metrics.cam_curve_interval=0.01",
        ]
    )
    assert MetricSettings.from_config(config["metrics"]) == MetricSettings(0.0, 0.01)
    for assignment in ("metrics.empty_dice=nan", "metrics.cam_curve_interval=0"):
        with pytest.raises(ConfigError, match=assignment.split("=")[0]):
            tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", "--set", assignment])


def test_set_keeps_int_kmax_distinct_from_float():
    config, _ = tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", "--set", "model.kmax=1"])
    assert config["model"]["kmax"] == 1 and isinstance(config["model"]["kmax"], int)


def test_set_changes_checked_together():
    config, _ = tools.get_yaml_args(
        [
            "--yaml",
            "cuball-no-erasing.yaml",
            "--set",
            "nbr_classes=5",
            "--set",
            "model.num_classes=5",
        ]
    )
    assert config["nbr_classes"] == config["model"]["num_classes"] == 5


@pytest.mark.parametrize(
    "assignment, expected",
    [
        ("model.kmaxx=0.1", "unknown key model.kmaxx (did you mean model.kmax?)"),
        ("modell.kmax=0.1", "unknown key modell (did you mean model?)"),
        ("model=1", "model is a section"),
        ("batch_size.x=1", "batch_size is not a section"),
        ("model.dropout=1.5", "command line (--set): model.dropout = 1.5 is out of range"),
        (
            "model.pretrained=maybe",
            "model.pretrained = 'maybe' is not an allowed value (expected one of true, false, 'synthetic')",
        ),
    ],
)
def test_set_rejects_bad_keys_and_values(assignment, expected):
    with pytest.raises(ConfigError) as info:
        tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", "--set", assignment])
    assert expected in str(info.value)


def test_set_without_equal_sign_is_an_argparse_error():
    with pytest.raises(SystemExit):
        tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", "--set", "model.kmax"])


def test_cli_k_refusal_for_tiny_crop():
    with pytest.raises(ConfigError) as info:
        tools.get_yaml_args(["--yaml", "synthetic-no-erasing.yaml", "--kmax", "0.09"])
    assert "round(0.09 * 4) = 0" in str(info.value)


def test_apply_overrides_logs_and_returns_a_new_dict(caplog):
    config = load_config(CONFIG_DIR / "glas-no-erasing.yaml")
    with caplog.at_level(logging.INFO, logger="deepmil.config"):
        updated = apply_overrides(
            config, {"model.kmax": "0.2", "optimizer.nesterov": "false"}, "test"
        )
    assert updated["model"]["kmax"] == 0.2 and updated["optimizer"]["nesterov"] is False
    assert config["model"]["kmax"] == 0.09
    assert "model.kmax: 0.09 -> 0.2" in caplog.text
    assert "optimizer.nesterov: true -> false" in caplog.text


def test_run_options_in_namespace(tmp_path):
    config, args = tools.get_yaml_args(
        [
            "--yaml",
            "glas-no-erasing.yaml",
            "--cudaid",
            "cpu",
            "--exp-root",
            str(tmp_path / "e"),
            "--quiet",
            "--overwrite",
        ]
    )
    assert (args.quiet, args.overwrite, args.resume) == (True, True, None)
    assert config["exp_root"] == args.exp_root == str(tmp_path / "e")
    assert config["cudaid"] == "cpu"
    _, args = tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml"])
    assert (args.quiet, args.overwrite, args.resume, args.cudaid) == (False, False, None, None)


def test_resume_reads_the_saved_config(tmp_path, monkeypatch):
    monkeypatch.delenv("MYSEED", raising=False)
    config, _ = tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", "--lr", "0.05"])
    config["MYSEED"] = 3
    save_config(config, tmp_path / "run" / "config.yaml")
    resumed, args = tools.get_yaml_args(["--resume", str(tmp_path / "run"), "--cudaid", "cpu"])
    assert args.resume == str(tmp_path / "run")
    assert resumed["optimizer"]["lr"] == 0.05 and resumed["MYSEED"] == 3
    assert resumed["cudaid"] == "cpu"
    with pytest.raises(ConfigError, match="--lr"):
        tools.get_yaml_args(["--resume", str(tmp_path / "run"), "--lr", "0.1"])
    monkeypatch.setenv("MYSEED", "4")
    with pytest.raises(ConfigError, match="seed 3"):
        tools.get_yaml_args(["--resume", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match="not found"):
        tools.get_yaml_args(["--resume", str(tmp_path / "nothing")])


def test_yaml_is_required_without_resume():
    with pytest.raises(ConfigError, match="--yaml"):
        tools.get_yaml_args(["--cudaid", "cpu"])


def test_data_root_priority(tmp_path, monkeypatch):
    data = glas_raw()
    data["data_root"] = "/from/config"
    path = str(write_config(tmp_path, data))
    assert tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml"])[0]["data_root"] == "./data"
    assert tools.get_yaml_args(["--yaml", path])[0]["data_root"] == "/from/config"
    monkeypatch.setenv("DEEPMIL_DATA_ROOT", "/from/env")
    assert tools.get_yaml_args(["--yaml", path])[0]["data_root"] == "/from/env"
    config, _ = tools.get_yaml_args(["--yaml", path, "--data-root", "/from/cli"])
    assert config["data_root"] == "/from/cli"


# ----------------------------------------------------------------------------- seed, saving


def test_env_seed_wins_over_yaml(monkeypatch):
    monkeypatch.setenv("MYSEED", "7")
    config, _ = tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", "--set", "MYSEED=3"])
    assert config["MYSEED"] == 7


def test_seed_flag_wins_over_env_and_yaml_and_every_source_is_logged(monkeypatch, caplog):
    args = ["--yaml", "glas-no-erasing.yaml", "--set", "MYSEED=3"]
    with caplog.at_level(logging.INFO, logger="deepmil.cli"):
        assert tools.get_yaml_args(args)[0]["MYSEED"] == 3
        monkeypatch.setenv("MYSEED", "7")
        assert tools.get_yaml_args([*args, "--seed", "5"])[0]["MYSEED"] == 5
    seeds = [record.getMessage() for record in caplog.records if "seed" in record.getMessage()]
    assert seeds == [
        "seed 3 (the configuration's MYSEED)",
        "seed 5 (--seed, which overrides MYSEED = 7)",
    ]
    assert all(
        record.levelno == logging.INFO for record in caplog.records if "seed" in record.getMessage()
    )
    with pytest.raises(SystemExit):
        tools.get_yaml_args([*args, "--seed", str(2**32)])


def test_seed_without_env_uses_config_value():
    config, _ = tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml"])
    assert config["MYSEED"] == 0
    config, _ = tools.get_yaml_args(["--yaml", "glas-no-erasing.yaml", "--set", "MYSEED=3"])
    assert config["MYSEED"] == 3


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", str(2**32)])
def test_invalid_env_seed(monkeypatch, value):
    monkeypatch.setenv("MYSEED", value)
    config = load_config(CONFIG_DIR / "glas-no-erasing.yaml")
    with pytest.raises(ConfigError) as info:
        resolve_seed(config)
    assert f"MYSEED = {value!r} is not a valid seed" in str(info.value)


def test_save_config_round_trip(tmp_path):
    config, _ = tools.get_yaml_args(
        [
            "--yaml",
            "cub5-4-erasing.yaml",
            "--cudaid",
            "0,1",
            "--set",
            "optimizer.lr_scheduler.milestones=[10, 20]",
        ]
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]


def test_validate_config_is_idempotent():
    config = load_config(CONFIG_DIR / "synthetic-4-erasing.yaml")
    assert validate_config(config, "again") == config


TRANSFER_CONFIGS = [name for name in available_configs() if name.startswith("synthetic-transfer-")]


@pytest.mark.parametrize("name", TRANSFER_CONFIGS)
def test_transfer_configs_start_from_the_synthetic_trunk_at_paper_like_map_sizes(name):
    config = load_config(CONFIG_DIR / name)
    model = config["model"]
    localizer = [feature_map_size(side) for side in config["crop_size"]]
    classifier = [
        feature_map_size(int(side * s)) for side, s in zip(config["crop_size"], model["scale"])
    ]
    assert model["pretrained"] == "synthetic"
    assert min(localizer) >= 8 and min(classifier) >= 4
    assert get_k(model["kmax"], classifier[0] * classifier[1]) >= 1
    assert round(model["kmax"] * classifier[0] * classifier[1]) >= 1


def test_every_method_of_the_transfer_comparison_has_a_config():
    methods = {load_config(CONFIG_DIR / name)["method"] for name in TRANSFER_CONFIGS}
    assert methods == set(METHOD_NAMES) and len(TRANSFER_CONFIGS) == 6


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_real_dataset_configs_keep_the_imagenet_weights(name):
    assert load_config(CONFIG_DIR / name)["model"]["pretrained"] is True


def test_resume_refuses_another_seed_from_the_flag_or_the_environment(tmp_path, monkeypatch):
    config, _ = tools.get_yaml_args(["--yaml", "synthetic-no-erasing.yaml"])
    save_config(config, tmp_path / "config.yaml")
    assert tools.get_yaml_args(["--resume", str(tmp_path), "--seed", "0"])[0]["MYSEED"] == 0
    with pytest.raises(ConfigError, match="used seed 0 but --seed = 4; drop it or set it to 0"):
        tools.get_yaml_args(["--resume", str(tmp_path), "--seed", "4"])
    monkeypatch.setenv("MYSEED", "2")
    with pytest.raises(ConfigError, match="used seed 0 but MYSEED = 2"):
        tools.get_yaml_args(["--resume", str(tmp_path)])


def test_help_lists_the_choices_and_its_examples_are_valid_commands():
    text = build_parser().format_help()
    assert "overrides method (str): " + ", ".join(METHOD_NAMES) in " ".join(text.split())
    examples = [line.split()[2:] for line in EPILOG.splitlines() if "train_deepmil.py" in line]
    assert len(examples) == 5
    assert any("--evaluate" in arguments for arguments in examples)
    for arguments in examples:
        build_parser().parse_args(arguments)
    for arguments in examples[:2]:
        config, _ = tools.get_yaml_args(arguments)
        assert config["yaml"] == arguments[1]
