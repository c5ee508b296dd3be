"""``deepmil.predict``: masks of any image from a trained experiment."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import loader
from deepmil import predict
from deepmil.config import load_config
from deepmil.engine import evaluate
from deepmil.metrics import f1_pos_neg
from deepmil.settings import RunSettings


def run_predict(exp: Path, images: str, out: str, *extra: str) -> int:
    """``python -m deepmil.predict`` on the CPU, in this process; its exit code."""
    return predict.main(
        ["--exp", str(exp), "--images", images, "--out", out, "--cudaid", "cpu", *extra]
    )


@pytest.fixture(scope="module")
def test_set(reference) -> loader.PhotoDataset:
    """The reference run's test set."""
    config = load_config(reference / "config.yaml")
    return loader.build_dataset(loader.DataConfig.from_config(config), "test", train=False)


@pytest.fixture(scope="module")
def evaluated(reference, test_set) -> list[dict]:
    """Every test image's prediction by the evaluation loop, with the best weights."""
    predictor = predict.load(reference)
    config = load_config(reference / "config.yaml")
    test_loader = loader.make_loader(test_set, 1, 0, shuffle=False, seed=0)
    run = RunSettings.from_config(config, torch.device("cpu"))
    return evaluate(predictor.network, test_loader, run, keep=len(test_set)).records


def test_predict_on_a_folder_reproduces_the_test_set_masks(
    reference, test_set, evaluated, tmp_path
):
    """The command on a folder of the test images writes the maps, masks, classes and
    probabilities that the evaluation of the test set computed."""
    images = tmp_path / "images"
    images.mkdir()
    for path in test_set.image_paths:
        shutil.copy(path, images / path.name)
    code = run_predict(reference, str(images), str(tmp_path / "out"), "--map-format", "npy")
    assert code == 0
    predictor = predict.load(reference)
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    assert len(rows) == len(test_set)
    for record in evaluated:
        name = test_set.image_paths[record["index"]].name
        expected = record["mask"][0].numpy()
        saved = np.load(tmp_path / "out" / "maps" / f"{name}.npy")
        np.testing.assert_array_equal(saved, expected)
        mask = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{name}.png"))
        np.testing.assert_array_equal(mask == 255, expected >= 0.5)
        assert rows[name]["class"] == predictor.classes[record["predicted"]]
        assert float(rows[name]["confidence"]) == pytest.approx(record["probability"], abs=1e-6)
        probabilities = [float(rows[name][label]) for label in predictor.classes]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        overlay = Image.open(tmp_path / "out" / "overlays" / f"{name}.png")
        assert overlay.size == Image.open(images / name).size
    f1_pos = [
        float(
            f1_pos_neg(
                torch.from_numpy(np.load(tmp_path / "out" / "maps" / f"{name}.npy")),
                test_set[index]["mask"][0],
            )[0]
        )
        for index, name in enumerate(path.name for path in test_set.image_paths)
    ]
    final = json.loads((reference / "final_metrics.json").read_text())
    assert 100 * sum(f1_pos) / len(f1_pos) == pytest.approx(final["test"]["f1_pos"], rel=1e-9)


def test_the_python_interface_equals_the_evaluation(reference, test_set, evaluated):
    predictor = predict.load(reference)
    record = evaluated[0]
    path = test_set.image_paths[record["index"]]
    result = predictor.predict(path)
    np.testing.assert_array_equal(result.map, record["mask"][0].numpy())
    np.testing.assert_array_equal(result.mask, record["mask"][0].numpy() >= 0.5)
    assert result.predicted == record["predicted"]
    assert result.class_name == predictor.classes[record["predicted"]]
    assert result.confidence == pytest.approx(record["probability"], abs=1e-6)
    assert np.array_equal(predictor.predict(Image.open(path)).map, result.map)


def test_a_batch_of_same_size_images_equals_one_by_one(reference, test_set):
    predictor = predict.load(reference)
    images = [loader.load_rgb(path) for path in test_set.image_paths[:4]]
    together = predictor.predict_batch(images)
    for image, batched in zip(images, together):
        alone = predictor.predict(image)
        np.testing.assert_allclose(batched.map, alone.map, atol=1e-5)
        np.testing.assert_allclose(batched.probabilities, alone.probabilities, atol=1e-5)


def test_any_size_and_the_16_bit_map(reference, tmp_path):
    """An image of another size gets a map of its own size; the PNG map holds value * 65535."""
    predictor = predict.load(reference)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 91, 3), dtype=np.uint8))
    result = predictor.predict(image)
    assert result.map.shape == (37, 91)
    assert 0.0 <= result.map.min() and result.map.max() <= 1.0
    image.save(tmp_path / "odd.jpg")
    code = run_predict(reference, str(tmp_path / "*.jpg"), str(tmp_path / "out"))
    assert code == 0
    saved = np.asarray(Image.open(tmp_path / "out" / "maps" / "odd.jpg.png"))
    assert saved.dtype == np.uint16 and saved.shape == (37, 91)
    expected = predictor.predict(tmp_path / "odd.jpg").map
    np.testing.assert_array_equal(saved, np.rint(expected * 65535).astype(np.uint16))


def test_unreadable_images_are_reported_and_the_rest_predicted(
    reference, test_set, tmp_path, capsys
):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    shutil.copy(test_set.image_paths[0], images / "sub" / "good.png")
    (images / "broken.png").write_bytes(b"not an image")
    (images / "notes.txt").write_text("ignored: not an image format")
    truncated = test_set.image_paths[1].read_bytes()
    (images / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    code = run_predict(reference, str(images), str(tmp_path / "out"))
    captured = capsys.readouterr()
    assert code == 1
    assert "1 of 3 images predicted" in captured.out
    assert f"failed: {images / 'broken.png'}: cannot read image" in captured.err
    assert f"failed: {images / 'truncated.png'}: cannot decode image" in captured.err
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        assert [row["image"] for row in csv.DictReader(handle)] == ["sub/good.png"]
    assert (tmp_path / "out" / "masks" / "sub" / "good.png.png").is_file()


def test_bad_arguments_are_named(reference, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert (
        predict.main(
            ["--exp", str(reference), "--images", str(missing), "--out", str(tmp_path / "o")]
        )
        == 1
    )
    assert f"no such image, folder or pattern: {missing}" in capsys.readouterr().err
    assert (
        predict.main(
            ["--exp", str(missing), "--images", str(tmp_path), "--out", str(tmp_path / "o")]
        )
        == 1
    )
    assert f"experiment folder not found: {missing}" in capsys.readouterr().err
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "same.png")
    args = ["--exp", str(reference), "--out", str(tmp_path / "o"), "--images"]
    assert (
        predict.main([*args, str(tmp_path / "a" / "same.png"), str(tmp_path / "b" / "same.png")])
        == 1
    )
    assert "would both be written as 'same.png'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main(["--images", str(tmp_path), "--out", str(tmp_path / "o")])


def test_the_run_records_its_class_names(reference):
    """``classes.yaml`` lets a folder predict without the fold folder it was trained from."""
    assert predict.class_names(reference, {}) == predict.load(reference).classes
    config = load_config(reference / "config.yaml")
    assert predict.class_names(None, config) == predict.class_names(reference, {})


def test_mask_outline_by_hand():
    mask = np.zeros((5, 5), dtype=bool)
    mask[1:4, 1:4] = True
    expected = mask.copy()
    expected[2, 2] = False
    np.testing.assert_array_equal(predict.mask_outline(mask), expected)
    assert predict.mask_outline(np.ones((2, 2), dtype=bool)).all()


def test_weights_and_config_instead_of_a_folder(reference):
    by_files = predict.load(config=reference / "config.yaml", weights=reference / "best_model.pt")
    by_folder = predict.load(reference)
    image = Image.new("RGB", (64, 64), (120, 30, 200))
    assert np.array_equal(by_files.predict(image).map, by_folder.predict(image).map)


def test_missing_weights_are_named(reference, tmp_path):
    folder = Path(shutil.copytree(reference, tmp_path / "copy"))
    (folder / "best_model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="best_model.pt does not exist"):
        predict.load(folder)
