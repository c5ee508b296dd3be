"""Probes of faults found by trying to break a run: concurrent runs, signals during writes,
divergence, resuming odd folders, generation failures. Each test names the symptom it keeps
away. Fixtures (the tiny dataset, the reference run, the in-process command line) come from
tests/conftest.py, helpers from tests/helpers.py."""

import errno
import json
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import create_folds
import deepmil.engine
import deepmil.synthetic
from deepmil import checkpoint, experiment, files
from deepmil.config import (
    CONFIG_DIR,
    ConfigError,
    default_values,
    load_config,
    merge_sections,
    save_config,
)
from deepmil.registry import dataset_spec
from deepmil.synthetic import SyntheticSpec
from helpers import (
    BATCH,
    TRAIN_CSV,
    epoch_metrics,
    final_metrics,
    run_cli,
    start_cli,
    temporary_files,
    tiny_args,
    wait_for_epochs,
)
from loader import DataConfig, dataset_root, load_mask, load_rgb, read_fold_csv, read_size
from tools import get_yaml_args

SPEC_A = SyntheticSpec(image_size=32, n_train=4, n_test=2)
SPEC_B = SyntheticSpec(image_size=32, n_train=4, n_test=2, seed=1)


# ----------------------------------------------------------------------------- concurrent runs


def test_synthetic_data_in_use_are_not_regenerated_for_another_spec(tmp_path):
    """Symptom: a second run with other ``synthetic:`` values regenerated the data that a first
    run was still reading (it then scored another dataset's images and exited 0)."""
    data, folds = tmp_path / "data", tmp_path / "folds"
    with create_folds.synthetic_folds_held(data, folds, SPEC_A):
        spec_json = (data / "synthetic" / "spec.json").read_text()
        images = {path.name: path.read_bytes() for path in (data / "synthetic").rglob("*.png")}
        with create_folds.synthetic_folds_held(data, folds, SPEC_A):  # same spec: shared
            pass
        with pytest.raises(RuntimeError, match="in use by another run with other 'synthetic:'"):
            with create_folds.synthetic_folds_held(data, folds, SPEC_B):
                pass
        assert (data / "synthetic" / "spec.json").read_text() == spec_json
        assert images == {
            path.name: path.read_bytes() for path in (data / "synthetic").rglob("*.png")
        }
    with create_folds.synthetic_folds_held(data, folds, SPEC_B):  # free again: regenerates
        assert deepmil.synthetic.is_complete(data / "synthetic", SPEC_B)


def test_synthetic_sets_of_other_fold_names_live_side_by_side(tmp_path):
    data, folds = tmp_path / "data", tmp_path / "folds"
    with create_folds.synthetic_folds_held(data, folds, SPEC_A):
        with create_folds.synthetic_folds_held(data, folds, SPEC_B, "synthetic-b") as fold_b:
            assert deepmil.synthetic.is_complete(data / "synthetic", SPEC_A)
            assert deepmil.synthetic.is_complete(data / "synthetic-b", SPEC_B)
            assert fold_b == folds / "synthetic-b" / "split_0" / "fold_0"
    config = merge_sections(
        default_values(),
        {
            "data_root": str(data),
            "dataset": "synthetic",
            "fold_name": "synthetic-b",
            "name_classes": "encoding.yaml",
            "model": {"num_classes": 2},
        },
    )
    assert dataset_root(DataConfig.from_config(config)) == data / "synthetic-b"
    assert dataset_root(DataConfig.from_config(config | {"fold_name": None})) == data / "synthetic"


def run_files(folder: Path) -> dict[str, bytes]:
    """The bytes of every file of a run folder but its lock file (which holds the owner's pid)."""
    return {
        path.name: path.read_bytes()
        for path in folder.iterdir()
        if path.is_file() and path.name != experiment.LOCK_FILE
    }


def test_a_locked_experiment_folder_is_refused_and_left_alone(cli, dataset, reference, tmp_path):
    """Symptom: a second run with the same --exp-name and --overwrite wrote its config beside
    the first run's metrics, and its clean-up deleted the first run's config.yaml."""
    folder = shutil.copytree(reference, tmp_path / "exps" / "busy")
    before = run_files(folder)
    args = tiny_args(dataset, "--exp-name", "busy", "--overwrite", exp_root=str(tmp_path / "exps"))
    with experiment.folder_lock(folder):
        code, err = cli(args)
        assert code == 1 and f"experiment folder {folder} is in use by another run" in err
        code, err = cli(["--resume", str(folder), "--cudaid", "cpu", "--quiet"])
        assert code == 1 and "is in use by another run" in err
    assert run_files(folder) == before


# ----------------------------------------------------------------------------- signals


def test_signals_are_deferred_until_a_write_is_done():
    handled = []
    previous = signal.signal(signal.SIGTERM, lambda number, _: handled.append(number))
    try:
        with files.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert handled == []
        assert handled == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_the_checkpoint_write_exits_143_with_a_whole_checkpoint(
    cli, dataset, monkeypatch
):
    """Symptom: SIGTERM while ``checkpoint.pt`` was written exited 1 with a torch ``enforce
    fail ... unexpected pos`` message."""
    real_save, count = torch.save, iter(range(10**6))

    def save(obj, stream):
        if next(count) == 2:  # the checkpoint of epoch 1
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(obj, stream)

    monkeypatch.setattr(torch, "save", save)
    code, err = cli(tiny_args(dataset, "--exp-name", "term-in-write"))
    folder = dataset / "exps" / "term-in-write"
    assert code == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err
    assert checkpoint.read_training_state(folder / "checkpoint.pt")["epoch"] == 1
    assert not temporary_files(folder)


# ----------------------------------------------------------------------------- divergence


def test_weights_that_turn_nan_stop_with_a_divergence_error(cli, dataset, monkeypatch):
    """Symptom: NaN weights with a finite loss stopped inside the PxAP meter ("mask values must
    lie in [0, 1], got [nan, nan]") without a word of divergence."""
    batches = -(-len((dataset / TRAIN_CSV).read_text().splitlines()) // BATCH)
    real, count = deepmil.engine.plain_step, iter(range(10**6))

    def step(model, *args, **kwargs):
        stats = real(model, *args, **kwargs)
        if next(count) == batches - 1:  # the loss of the last batch of epoch 0 is finite
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(deepmil.engine, "plain_step", step)
    code, err = cli(tiny_args(dataset, "--exp-name", "nan-weights"))
    assert code == 1 and "non-finite weights after epoch 0 (training diverged): conv1.weight" in err


def test_non_finite_evaluation_outputs_are_a_divergence_error():
    with pytest.raises(deepmil.engine.NonFiniteLossError, match="evaluating test.csv, batch 3"):
        deepmil.engine.check_finite_outputs(
            torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2, 2), "test.csv", 3
        )
    deepmil.engine.check_finite_outputs(torch.zeros(1, 2), torch.zeros(1, 2, 2), "test.csv", 3)


# ----------------------------------------------------------------------------- resuming


def test_resume_of_a_run_killed_before_its_first_checkpoint(cli, reference, tmp_path):
    """Symptom: --resume said "start a new run", and the same command then said the folder
    already exists."""
    folder = shutil.copytree(reference, tmp_path / "early")
    for name in experiment.RUN_FILES:
        if name not in ("config.yaml", "environment.json", "training.log"):
            (folder / name).unlink(missing_ok=True)
    code, err = cli(["--resume", str(folder), "--cudaid", "cpu", "--quiet"])
    assert code == 0, err
    assert epoch_metrics(folder) == epoch_metrics(reference)
    assert final_metrics(folder) == final_metrics(reference)


def test_resume_with_crf_scores_the_crf_masks(cli, reference, tmp_path):
    """Symptom: ``--resume EXP --crf`` dropped ``--crf`` silently."""
    folder = shutil.copytree(reference, tmp_path / "crf")
    code, err = cli(["--resume", str(folder), "--cudaid", "cpu", "--quiet", "--crf"])
    assert code == 0, err
    assert "crf_f1_pos" in final_metrics(folder)["test"]
    assert "crf_f1_pos" not in final_metrics(reference)["test"]


def test_resume_of_a_finished_run_says_so_and_changes_nothing(cli, reference, tmp_path):
    """Symptom: ``--resume`` on a finished run ran the whole final evaluation again."""
    folder = shutil.copytree(reference, tmp_path / "done")
    before = run_files(folder)
    code, err = cli(["--resume", str(folder), "--cudaid", "cpu"])
    assert code == 0, err
    assert f"{folder}: the run is already finished" in cli.stdout
    assert run_files(folder) == before


def test_bare_weights_in_place_of_the_checkpoint(cli, reference, tmp_path):
    """Symptom: an uncaught ``KeyError: 'history'``."""
    folder = shutil.copytree(reference, tmp_path / "weights")
    shutil.copy(folder / "best_model.pt", folder / "checkpoint.pt")
    (folder / "final_metrics.json").unlink()
    code, err = cli(["--resume", str(folder), "--cudaid", "cpu", "--quiet"])
    assert code == 1
    assert f"{folder / 'checkpoint.pt'} is not a training checkpoint (no epoch, model" in err


def test_config_has_the_mode_of_every_other_result_file(reference):
    """Symptom: ``config.yaml`` was written with mode 0600."""
    mode = stat.S_IMODE((reference / "final_metrics.json").stat().st_mode)
    assert stat.S_IMODE((reference / "config.yaml").stat().st_mode) == mode == files.FILE_MODE


# ----------------------------------------------------------------------------- generation


def test_synthetic_generation_on_a_full_disk(tmp_path, monkeypatch):
    """Symptom: ``[Errno 28]`` without a path, and a ``.synthetic.tmp-<pid>`` folder left."""

    def full(folder, spec):
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "part.png").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(deepmil.synthetic, "_write_dataset", full)
    root = tmp_path / "synthetic"
    with pytest.raises(OSError, match=f"cannot write the synthetic dataset into {root}: No space"):
        deepmil.synthetic.ensure_synthetic_dataset(root, SPEC_A)
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path):
    root = tmp_path / "synthetic"
    stale = tmp_path / ".synthetic.tmp-999999999"
    live = tmp_path / f".synthetic.tmp-{os.getppid()}"
    for folder in (stale, live):
        (folder / "images").mkdir(parents=True)
    deepmil.synthetic.ensure_synthetic_dataset(root, SPEC_A)
    assert not stale.exists() and live.exists()
    assert deepmil.synthetic.is_complete(root, SPEC_A)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4])
def test_a_kill_during_an_erasing_epoch_resumes_to_the_same_result(reference, dataset, delay):
    """SIGKILL at several moments of epoch 2 (recursive erasing), then --resume."""
    folder = dataset / "exps" / f"killed-erasing-{delay}"
    process = start_cli(tiny_args(dataset, "--exp-name", folder.name))
    wait_for_epochs(process, folder / "metrics.jsonl", 2)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    result = run_cli(["--resume", str(folder), "--cudaid", "cpu", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert epoch_metrics(folder) == epoch_metrics(reference)
    assert final_metrics(folder) == final_metrics(reference)


# ----------------------------------------------------------------------------- bad input


def alias_bomb(levels: int = 9) -> str:
    """A "billion laughs" YAML document under the known key ``model.name``."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel:\n  name: *a{levels - 1}\n"


def test_a_yaml_alias_bomb_is_refused_quickly_and_briefly(tmp_path):
    """Symptom: a 336-byte file gave a 351 MB error message (20 s, 1.4 GB of memory)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    began = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert time.perf_counter() - began < 1.0 and len(str(error.value)) < 1000
    assert "anchors and aliases (&name, *name) are not allowed" in str(error.value)
    assert "bomb.yaml" in str(error.value)
    with pytest.raises(ConfigError, match="anchors and aliases") as error:
        get_yaml_args(["--yaml", "synthetic-no-erasing.yaml", "--set", "model.name=&x [1, *x]"])


def test_long_values_are_cut_in_messages(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("base: synthetic-no-erasing.yaml\nmodel:\n  name: " + "x" * 100_000 + "\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert len(str(error.value)) < 1000 and "(100002 characters)" in str(error.value)


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("dataset: synthetic  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: the configuration is not UTF-8 text"):
        load_config(path)


def test_a_fold_csv_with_a_byte_order_mark(tmp_path):
    """Symptom: "file not found" for a path starting with an invisible U+FEFF."""
    path = tmp_path / "train.csv"
    path.write_bytes("\ufeffimages/a.png,masks/a.png,class0\n".encode("utf-8"))
    assert read_fold_csv(path)[0].image == "images/a.png"


def test_16_bit_images_are_scaled_and_16_bit_masks_kept_exact(tmp_path):
    """Symptom: 99.6 % of a 0..65535 ramp became 255 and training went on."""
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    grey = np.asarray(load_rgb(tmp_path / "ramp.png"))[..., 0]
    assert np.array_equal(grey, np.rint(ramp / 257).astype(np.uint8))
    assert (grey == 255).mean() < 0.01
    labels = np.zeros((4, 4), np.uint16)
    labels[0, :2], labels[1, :3] = 1, 40000  # instance ids, and a CUB-like soft mask
    Image.fromarray(labels).save(tmp_path / "mask.png")
    assert load_mask(tmp_path / "mask.png", dataset_spec("glas").mask_threshold).sum() == 5
    cub = dataset_spec("Caltech-UCSD-Birds-200-2011").mask_threshold
    assert load_mask(tmp_path / "mask.png", cub).sum() == 3  # 40000 > 32767.5, 1 is not


def test_32_bit_and_float_images_are_refused_by_name(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    with pytest.raises(ValueError, match=f"cannot decode image {path}: 'F' images"):
        load_rgb(path)


def test_an_image_over_the_pixel_limit_is_named(tmp_path, monkeypatch):
    """Symptom: an uncaught ``DecompressionBombError`` naming no file."""
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000
    for read in (read_size, load_rgb):
        with pytest.raises(
            ValueError,
            match=f"cannot read image {path}: it is larger than Pillow's limit of 1000 pixels",
        ):
            read(path)


def test_every_corrupt_file_is_listed_before_training(cli, own_data):
    """Symptom: a truncated test image stopped the run only at the final evaluation."""
    test_csv = own_data / "folds" / "synthetic" / "split_0" / "fold_0" / "test_s_0_f_0.csv"
    rows = [line.split(",") for line in test_csv.read_text().splitlines()]
    broken = [
        own_data / "data" / "synthetic" / rows[0][0],
        own_data / "data" / "synthetic" / rows[1][1],
    ]
    for path in broken:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = cli(tiny_args(own_data))
    assert code == 1 and "2 of " in err and "image files cannot be decoded" in err
    assert all(f"cannot decode image {path}" in err for path in broken)
    assert not (own_data / "exps").exists()


def test_duplicated_rows_warn_and_overlapping_splits_are_refused(cli, own_data, caplog):
    """Symptom: duplicated rows, and the same image in train and test, were accepted."""
    fold = own_data / "folds" / "synthetic" / "split_0" / "fold_0"
    train, test = fold / "train_s_0_f_0.csv", fold / "test_s_0_f_0.csv"
    first = train.read_text().splitlines()[0]
    train.write_text(train.read_text() + first + "\n")
    rows = read_fold_csv(train)
    assert f"{train} lists 1 image(s) more than once: {first.split(',')[0]}" in caplog.text
    test.write_text(test.read_text() + first + "\n")
    code, err = cli(tiny_args(own_data))
    assert code == 1 and f"listed in both {train} and {test}, e.g. {rows[0].image}" in err


def test_a_saved_config_with_a_shared_value_loads_again(tmp_path):
    """A list shared by two keys must not be saved as an anchor the loader refuses."""
    config = load_config(CONFIG_DIR / "synthetic-no-erasing.yaml")
    config["padding_size"] = config["model"]["scale"]
    save_config(config, tmp_path / "config.yaml")
    assert "&" not in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml")["padding_size"] == config["model"]["scale"]


# ----------------------------------------------------------------------------- --evaluate


def test_evaluate_scores_the_selected_model_again_and_leaves_the_run_alone(
    cli, reference, tmp_path
):
    """Symptom: evaluate-only needed --yaml, printed "selected epoch -1", named its folder like
    a training run and always evaluated the training set too."""
    folder = shutil.copytree(reference, tmp_path / "run")
    before = run_files(folder)
    code, err = cli(["--evaluate", str(folder), "--cudaid", "cpu", "--quiet"])
    assert code == 0, err
    trained = json.loads((folder / "final_metrics.json").read_text())
    evaluated = json.loads((folder / "evaluation" / "final_metrics.json").read_text())
    assert set(evaluated) == {"test"} and evaluated["test"] == trained["test"]
    assert f"selected epoch {trained['best_epoch']} (best_model.pt); results in" in cli.stdout
    assert (folder / "evaluation" / "test_predictions.png").is_file()
    assert "evaluating" in (folder / "evaluation" / "evaluation.log").read_text()
    assert run_files(folder) == before
    code, err = cli(["--evaluate", str(folder), "--sets", "test,valid", "--cudaid", "cpu"])
    assert code == 0, err
    evaluated = json.loads((folder / "evaluation" / "final_metrics.json").read_text())
    assert list(evaluated) == ["valid", "test", "best_threshold"]
    assert evaluated == {name: trained[name] for name in evaluated}


def test_evaluate_refuses_what_it_cannot_do(cli, reference, tmp_path):
    folder = str(reference)
    cases = [
        (["--sets", "test", "--yaml", "synthetic-no-erasing.yaml"], "--sets chooses the sets"),
        (["--evaluate", folder, "--yaml", "x.yaml"], "--evaluate reads the run's saved"),
        (["--evaluate", folder, "--resume", folder], "--resume and --evaluate exclude"),
        (["--evaluate", str(tmp_path)], f"{tmp_path / 'config.yaml'} not found"),
    ]
    for args, message in cases:
        code, err = cli([*args, "--cudaid", "cpu", "--quiet"])
        assert code == 1 and message in err, (args, err)
    with pytest.raises(SystemExit):
        cli(["--evaluate", folder, "--sets", "test,holdout"])
    untrained = shutil.copytree(reference, tmp_path / "untrained")
    (untrained / "best_model.pt").unlink()
    code, err = cli(["--evaluate", str(untrained), "--cudaid", "cpu", "--quiet"])
    assert code == 1 and "no best_model.pt (no epoch of the run has finished)" in err
