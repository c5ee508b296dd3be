"""Your own images (``dataset: folder``): the fold builder of a folder per class, training on the
image labels alone, localisation metrics on the images that have a mask, and the errors of bad
input."""

import dataclasses
import json
import math
import random
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import create_folds
import loader
from deepmil import report
from deepmil.config import apply_overrides, load_config, resolve_yaml_path
from deepmil.engine import evaluate, predictions
from deepmil.methods import build_network
from deepmil.metrics import (
    LocalizationMeter,
    PxAPMeter,
    ThresholdSweepMeter,
    best_threshold_report,
    f1_pos_neg,
    iou_at,
)
from deepmil.model import MinMaxEntropyNet
from deepmil.registry import dataset_spec
from deepmil.settings import RunSettings
from helpers import REPO, final_metrics, only_folder

README = REPO / "README.md"
CLASSES = ("circle", "square", "triangle")
SIZE = 64
CPU = torch.device("cpu")
FOLD = Path("folds") / "folder" / "split_0" / "fold_0"


# ----------------------------------------------------------------------------- data


def shape_mask(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A filled circle, square or triangle at a random place of a SIZE x SIZE image."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(SIZE // 4, 3 * SIZE // 4, size=2)
    radius = int(rng.integers(SIZE // 8, SIZE // 4))
    if kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if kind == "square":
        return (abs(yy - cy) <= radius) & (abs(xx - cx) <= radius)
    return (yy >= cy) & (yy - cy <= radius) & (abs(xx - cx) <= yy - cy)


def write_shapes(root: Path, per_class: int = 10, masks: bool = True) -> None:
    """``root/<class>/<i>.png``: a shape of its class over noise; with ``masks``, the
    even-numbered images get ``root/masks/<class>/<i>.png``."""
    rng = np.random.default_rng(0)
    for kind in CLASSES:
        for number in range(per_class):
            mask = shape_mask(kind, rng)
            pixels = rng.integers(0, 128, size=(SIZE, SIZE, 3), dtype=np.uint8)
            pixels[mask] = (230, 200, 40)
            save(Image.fromarray(pixels), root / kind / f"{number:03d}.png")
            if masks and number % 2 == 0:
                mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
                save(mask_image, root / "masks" / kind / f"{number:03d}.png")


def save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def fold_rows(folds: Path, split: str) -> list[list[str]]:
    return [line.split(",") for line in (folds / f"{split}_s_0_f_0.csv").read_text().splitlines()]


def folder_config(root: Path, num_classes: int = 3) -> loader.DataConfig:
    """The data settings of ``folder.yaml`` with data in ``root / 'shapes'`` and folds in
    ``root / 'folds'``."""
    config = load_config(resolve_yaml_path("folder.yaml"))
    config.update(data_root=str(root / "shapes"), fold_folder=str(root / "folds"))
    config["model"]["num_classes"] = num_classes
    return loader.DataConfig.from_config(config)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A folder holding ``shapes/`` (masks for the even-numbered images) and its ``folds/``."""
    root = tmp_path_factory.mktemp("own")
    write_shapes(root / "shapes")
    argv = ["--dataset", "folder", "--root", str(root / "shapes"), "--out", str(root / "folds")]
    assert create_folds.main(argv) == 0
    return root


# ----------------------------------------------------------------------------- fold builder


def test_folds_follow_the_split_rules(shapes):
    folds = shapes / FOLD
    splits = {name: fold_rows(folds, name) for name in ("train", "valid", "test")}
    images = [row[0] for rows in splits.values() for row in rows]
    assert len(images) == len(set(images)) == 30
    for kind in CLASSES:
        counts = {name: sum(row[2] == kind for row in rows) for name, rows in splits.items()}
        assert counts == {"train": 6, "valid": 2, "test": 2}
    assert yaml.safe_load((folds / "encoding.yaml").read_text()) == {
        "circle": 0,
        "square": 1,
        "triangle": 2,
    }
    for rows in splits.values():
        for image, mask, kind in rows:
            assert image.startswith(f"{kind}/")
            assert mask == (f"masks/{image}" if int(image[-7:-4]) % 2 == 0 else "")
    # The test set: per class, the first ceil(20%) of the sorted list shuffled 1 000 times.
    rng = random.Random(create_folds.SEED)
    expected_test = []
    for kind in CLASSES:
        names = [f"{kind}/{number:03d}.png" for number in range(10)]
        expected_test += create_folds.shuffle_times(rng, names)[:2]
    assert [row[0] for row in splits["test"]] == expected_test


def test_folds_are_deterministic(shapes, tmp_path):
    argv = ["--dataset", "folder", "--root", str(shapes / "shapes"), "--out", str(tmp_path)]
    assert create_folds.main(argv) == 0
    for name in ("train_s_0_f_0.csv", "valid_s_0_f_0.csv", "test_s_0_f_0.csv", "encoding.yaml"):
        ours = tmp_path / "folder" / "split_0" / "fold_0" / name
        assert ours.read_bytes() == (shapes / FOLD / name).read_bytes(), name


@pytest.mark.parametrize("n_images", [3, 4, 7, 12])
def test_every_class_size_from_3_on_gives_three_non_empty_stratified_sets(tmp_path, n_images):
    root = tmp_path / "data"
    for kind, count in (("a", n_images), ("b", 5)):
        for number in range(count):
            save(Image.new("RGB", (8, 8)), root / kind / f"{number}.jpg")
    folds = create_folds.folder_folds(root)
    test_size = math.ceil(n_images * 0.2)
    valid_size = math.ceil((n_images - test_size) * 0.2)
    sizes = [sum(row[2] == "a" for row in rows) for rows in (folds.train, folds.valid, folds.test)]
    assert sizes == [n_images - test_size - valid_size, valid_size, test_size]
    assert min(sizes) >= 1


def folds_error(capsys, root: Path, out: Path) -> str:
    argv = ["--dataset", "folder", "--root", str(root), "--out", str(out)]
    assert create_folds.main(argv) == 1
    assert not out.exists()
    return capsys.readouterr().err


def test_fold_builder_errors(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "folds"
    assert f"dataset folder not found: {root}" in folds_error(capsys, root, out)
    for number in range(3):
        save(Image.new("RGB", (8, 6)), root / "cat" / f"{number}.png")
    assert "holds 1 class folder(s) (cat); expected at least 2" in folds_error(capsys, root, out)
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("no image here")
    assert f"classes with too few images in {root}: 'dog' (0);" in folds_error(capsys, root, out)
    save(Image.new("RGB", (8, 6)), root / "dog" / "0.png")
    assert "'dog' (1); each class needs at least 3" in folds_error(capsys, root, out)
    (root / "dog" / "1.png").write_bytes(b"not an image")
    save(Image.new("RGB", (8, 6)), root / "dog" / "2.png")
    assert f"cannot read image {root / 'dog' / '1.png'}" in folds_error(capsys, root, out)
    save(Image.new("RGB", (8, 6)), root / "dog" / "1.png")
    save(Image.new("L", (6, 6)), root / "masks" / "dog" / "1.png")
    message = folds_error(capsys, root, out)
    assert (
        f"mask size (6, 6) of {root / 'masks' / 'dog' / '1.png'} differs from image size (6, 8)"
        in message
    )
    save(Image.new("L", (8, 6)), root / "masks" / "dog" / "1.png")
    save(Image.new("L", (8, 6)), root / "masks" / "dog" / "7.png")
    assert "1 mask(s) in" in folds_error(capsys, root, out)
    (root / "masks" / "dog" / "7.png").unlink()
    assert create_folds.main(["--dataset", "folder", "--root", str(root), "--out", str(out)]) == 0


def test_no_image_in_any_class_folder(tmp_path, capsys):
    for kind in ("a", "b"):
        (tmp_path / "data" / kind).mkdir(parents=True)
    message = folds_error(capsys, tmp_path / "data", tmp_path / "folds")
    suffixes = ".bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp"
    assert f"no image ({suffixes}) in the class folders of {tmp_path / 'data'}" in message


def test_the_folder_dataset_takes_root_and_the_others_data_root():
    for argv in (
        ["--dataset", "folder"],
        ["--dataset", "folder", "--root", "x", "--data-root", "y"],
        ["--dataset", "glas", "--root", "x"],
    ):
        with pytest.raises(SystemExit) as stop:
            create_folds.parse_args(argv)
        assert stop.value.code == 2


# ----------------------------------------------------------------------------- loader


def test_only_the_folder_dataset_accepts_rows_without_a_mask(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("circle/000.png,,circle\n")
    with pytest.raises(ValueError, match="line 1: empty field"):
        loader.read_fold_csv(path)
    assert loader.read_fold_csv(path, optional_mask=True) == [("circle/000.png", "", "circle")]
    path.write_text(",,circle\n")
    with pytest.raises(ValueError, match="line 1: empty field"):
        loader.read_fold_csv(path, optional_mask=True)
    assert dataset_spec("folder").optional_masks
    assert not any(dataset_spec(name).optional_masks for name in ("glas", "synthetic"))


def test_a_folder_config_takes_any_number_of_classes():
    config = load_config(resolve_yaml_path("folder.yaml"))
    changed = apply_overrides(config, {"nbr_classes": "7", "model.num_classes": "7"}, "test")
    assert changed["nbr_classes"] == changed["model"]["num_classes"] == 7
    with pytest.raises(ValueError, match="nbr_classes = 7 and model.num_classes = 2 differ"):
        apply_overrides(config, {"nbr_classes": "7"}, "test")


def test_an_image_without_a_mask_has_no_ground_truth(shapes):
    data = folder_config(shapes)
    test_set = loader.build_dataset(data, "test", train=False)
    for index, row in enumerate(test_set.rows):
        mask = test_set[index]["mask"]
        assert (mask is None) == (row.mask == "")
        if mask is not None:
            stored = np.asarray(Image.open(shapes / "shapes" / row.mask)) != 0
            assert torch.equal(mask[0], torch.from_numpy(stored.astype(np.float32)))
    train_set = loader.build_dataset(data, "train", train=True)
    assert train_set[0]["image"].shape == (3, 128, 128)


def test_summary_with_every_mask_is_that_of_a_dataset_whose_masks_are_required(shapes):
    """A set whose images all have a mask gives the same values whether masks are optional or
    not; only ``n_localized`` is added."""
    masked = [loader.FoldRow(*row) for row in fold_rows(shapes / FOLD, "test") if row[1]]
    spec = dataset_spec("folder")
    summaries = []
    for row_spec in (spec, dataclasses.replace(spec, optional_masks=False)):
        encoding = dict(zip(CLASSES, range(3)))
        dataset = loader.PhotoDataset(
            masked, shapes / "shapes", encoding, row_spec, train=False, crop_size=64
        )
        data = loader.make_loader(dataset, 1, 0, shuffle=False, seed=0)
        torch.manual_seed(0)
        network = MinMaxEntropyNet("resnet18", 3, modalities=2, kmax=1.0, kmin=1.0)
        summaries.append(evaluate(network, data, RunSettings()).summary)
    optional, required = summaries
    assert optional.pop("n_localized") == len(masked) and "n_localized" not in required
    assert optional == required


def test_loader_errors_name_the_file_line_or_value(shapes, tmp_path):
    data = folder_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"dataset folder not found: {tmp_path / 'shapes'}"):
        loader.build_dataset(data, "test", train=False)
    shutil.copytree(shapes / "shapes", tmp_path / "shapes")
    hint = f"--dataset folder --root {tmp_path / 'shapes'} --out {tmp_path / 'folds'}"
    with pytest.raises(FileNotFoundError, match=re.escape(hint)):
        loader.build_dataset(data, "test", train=False)
    shutil.copytree(shapes / "folds", tmp_path / "folds")
    csv_path = tmp_path / FOLD / "test_s_0_f_0.csv"
    rows = csv_path.read_text().splitlines()
    save(Image.new("L", (32, 48)), tmp_path / "shapes" / "masks" / "circle" / "small.png")

    def refused(lines: list[str], error: type, message: str, num_classes: int = 3) -> None:
        csv_path.write_text("".join(line + "\n" for line in lines))
        with pytest.raises(error, match=message):
            loader.build_dataset(folder_config(tmp_path, num_classes), "test", train=False)

    refused([], ValueError, "fold CSV is empty")
    refused([rows[0], "circle/000.png,,hexagon"], ValueError, "line 2: unknown class 'hexagon'")
    refused([rows[0], "circle/404.png,,circle"], FileNotFoundError, r"circle/404.png \(listed")
    refused(["circle/001.png,masks/circle/404.png,circle"], FileNotFoundError, "line 1")
    refused(
        ["circle/001.png,masks/circle/small.png,circle"],
        ValueError,
        r"mask size \(48, 32\) of .*small.png differs from image size \(64, 64\)",
    )
    refused(rows, ValueError, r"3 classes but model.num_classes is 2 \(set nbr_classes", 2)


# ----------------------------------------------------------------------------- training


def worked_example() -> list[list[str]]:
    """The commands of the documented worked example (the bash block under its heading)."""
    section = README.read_text(encoding="utf-8").split("### Worked example", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def model_outputs(folder: Path, split: str) -> list[dict]:
    """Per-image predictions of the selected model of the experiment in ``folder``."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    network = build_network(config, CPU)
    network.load_state_dict(torch.load(folder / "best_model.pt", weights_only=True))
    dataset = loader.build_dataset(loader.DataConfig.from_config(config), split, train=False)
    data = loader.make_loader(dataset, 1, 0, shuffle=False, seed=0)
    return list(predictions(network.eval(), data, RunSettings.from_config(config, CPU)))


def test_worked_example_localises_on_the_images_with_a_mask(tmp_path, monkeypatch, cli):
    folds_command, train_command = worked_example()
    assert folds_command[:2] == ["python", "create_folds.py"]
    assert train_command[:2] == ["python", "train_deepmil.py"]
    monkeypatch.chdir(tmp_path)
    write_shapes(tmp_path / "shapes")
    assert create_folds.main(folds_command[2:]) == 0
    code, err = cli(train_command[2:])
    assert code == 0, err
    folder = only_folder(tmp_path / "exps")
    final = final_metrics(folder)
    assert [final[name]["n_images"] for name in ("train_eval", "valid", "test")] == [18, 6, 6]
    sweeps = {}
    for split, name in (("valid", "valid"), ("test", "test"), ("train", "train_eval")):
        items = model_outputs(folder, split)
        masked = [item for item in items if item["truth"] is not None]
        metrics = final[name]
        assert metrics["n_images"] == len(items) == len(fold_rows(tmp_path / FOLD, split))
        assert (
            metrics["n_localized"]
            == len(masked)
            == sum(bool(row[1]) for row in fold_rows(tmp_path / FOLD, split))
        )
        assert 0 < len(masked) < len(items)
        errors = sum(item["predicted"] != item["label"] for item in items)
        assert metrics["cl_error"] == pytest.approx(100 * errors / len(items))
        f1 = [f1_pos_neg(item["mask"], item["truth"]) for item in masked]
        assert metrics["f1_pos"] == pytest.approx(100 * np.mean([float(p) for p, _ in f1]))
        assert metrics["f1_neg"] == pytest.approx(100 * np.mean([float(n) for _, n in f1]))
        ious = [float(iou_at(item["mask"], item["truth"])) for item in masked]
        assert metrics["iou"] == pytest.approx(100 * np.mean(ious))
        pxap, sweeps[split] = PxAPMeter(), ThresholdSweepMeter()
        for item in masked:
            pxap.update(item["mask"], item["truth"])
            sweeps[split].update(item["mask"], item["truth"])
        assert metrics["pxap"] == pytest.approx(pxap.compute())
    report = best_threshold_report(sweeps["valid"], sweeps["test"])
    assert final["best_threshold"] == pytest.approx(report)
    n_test = final["test"]["n_localized"]
    line = f"test: localisation on {n_test} of 6 images (those with a mask)"
    assert line in (folder / "results.md").read_text()
    assert line in (folder / "training.log").read_text()
    assert line in README.read_text(encoding="utf-8")
    for name in ("test_predictions.png", "test_mask_histograms.png", "learning_curves.png"):
        assert (folder / name).is_file()


def test_labels_alone_train_select_and_evaluate(tmp_path, monkeypatch, cli, capsys):
    monkeypatch.chdir(tmp_path)
    write_shapes(tmp_path / "shapes", per_class=4, masks=False)
    assert create_folds.main(["--dataset", "folder", "--root", "shapes"]) == 0
    args = ["--yaml", "folder.yaml", "--data-root", "shapes", "--epoch", "1", "--cudaid", "cpu"]
    code, err = cli([*args, "--set", "nbr_classes=3", "--set", "model.num_classes=3"])
    assert code == 0, err
    folder = only_folder(tmp_path / "exps")
    final = final_metrics(folder)
    for name in ("valid", "test", "train_eval"):
        metrics = final[name]
        assert metrics["n_localized"] == 0 and 0 <= metrics["cl_error"] <= 100
        for key in ("f1_pos", "f1_neg", "iou", "pxap", "f1_pos_all_ones", "truth_area"):
            assert math.isnan(metrics[key]), (name, key)
    assert all(math.isnan(value) for value in final["best_threshold"].values())
    assert final["best_epoch"] == 0
    assert f"{FOLD / 'test_s_0_f_0.csv'}: no image has a mask" in cli.stdout
    assert "test: localisation on 0 of 3 images" in (folder / "results.md").read_text()
    assert (folder / "test_predictions.png").is_file()
    assert not (folder / "test_mask_histograms.png").exists()
    assert report.main([str(folder), "--figure", str(tmp_path / "figure.png")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "no erasing" in line)
    assert row.endswith("| – | – | – | – |") and (tmp_path / "figure.png").is_file()
    record = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isnan(record["valid_f1_pos"]) and "valid_n_localized" not in record


def test_a_bad_fold_csv_stops_the_run_before_anything_is_written(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    write_shapes(tmp_path / "shapes", per_class=3, masks=False)
    assert create_folds.main(["--dataset", "folder", "--root", "shapes"]) == 0
    csv_path = FOLD / "valid_s_0_f_0.csv"
    csv_path.write_text(csv_path.read_text().replace(",circle", ",hexagon", 1))
    args = ["--yaml", "folder.yaml", "--data-root", "shapes", "--cudaid", "cpu", "--set"]
    code, err = cli([*args, "nbr_classes=3", "--set", "model.num_classes=3"])
    assert code == 1
    assert f"{csv_path}, line" in err and "unknown class 'hexagon'" in err
    assert not (tmp_path / "exps").exists()


# ----------------------------------------------------------------------------- metrics


def test_meter_averages_localisation_over_the_images_with_a_ground_truth():
    meter = LocalizationMeter()
    meter.update(0.5, 0.25, True, {"loss": 1.0}, f1_pos_all_ones=0.5, iou=0.75)
    meter.update(None, None, False, {"loss": 3.0})
    meter.update(1.0, 0.75, True, {"loss": 2.0}, f1_pos_all_ones=0.25, iou=0.25)
    summary = meter.compute()
    assert meter.n_localized == 2 and summary["n_images"] == 3
    assert summary["cl_error"] == pytest.approx(100 / 3) and summary["loss"] == 2.0
    assert (summary["f1_pos"], summary["f1_neg"], summary["iou"]) == (75.0, 50.0, 50.0)
    assert summary["f1_pos_all_ones"] == 37.5 and summary["top1_loc"] == 50.0
    meter.update(1.0, 1.0, True, {"loss": 0.0})
    with pytest.raises(ValueError, match="'f1_pos_all_ones' given for 2 of 3 images"):
        meter.compute()
    unlocalized = LocalizationMeter()
    unlocalized.update(None, None, True, {"loss": 1.0})
    summary = unlocalized.compute()
    assert summary["cl_error"] == 0.0 and summary["loss"] == 1.0
    for key in ("f1_pos", "f1_neg", "f1_pos_all_ones", "iou", "top1_loc"):
        assert math.isnan(summary[key])
