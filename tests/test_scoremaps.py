"""Saved score maps (``deepmil.scoremaps``) and the metrics computed again from them
(``deepmil.evaluate``)."""

import json
import shutil

import numpy as np
import pytest
import torch

import loader
from deepmil import evaluate, predict
from deepmil.config import load_config
from deepmil.scoremaps import read_scoremaps, scoremap_path, scoremap_writer


def test_the_run_saves_the_test_maps_and_rescoring_them_gives_its_metrics(reference, tmp_path):
    out = tmp_path / "rescored.json"
    assert evaluate.main(["--exp", str(reference), "--out", str(out)]) == 0
    rescored = json.loads(out.read_text())
    online = json.loads((reference / "final_metrics.json").read_text())["test"]
    assert {key: rescored[key] for key in online} == online
    for key in ("max_box_acc", "max_box_acc_v2", "top1_box_loc"):
        assert 0.0 <= rescored[key] <= 100.0
    assert rescored["top1_box_loc"] <= rescored["max_box_acc"]


def test_saved_maps_are_the_maps_of_the_selected_model(reference):
    """Each stored map equals the prediction of the run's best weights, and its class and
    probability are stored with it."""
    predictor = predict.load(reference)
    config = load_config(reference / "config.yaml")
    test_set = loader.build_dataset(loader.DataConfig.from_config(config), "test", train=False)
    items = list(read_scoremaps(scoremap_path(reference, "test")))
    assert [item["index"] for item in items] == list(range(len(test_set)))
    for item in items:
        assert item["image"] == test_set.rows[item["index"]].image
        result = predictor.predict(test_set.image_paths[item["index"]])
        np.testing.assert_array_equal(item["mask"][0].numpy(), result.map)
        assert item["predicted"] == result.predicted
        assert item["label"] == test_set.labels[item["index"]]
        assert item["probability"] == pytest.approx(result.confidence, abs=1e-6)
        assert set(item["losses"]) == {"loss_seg", "loss_pos", "loss_neg", "loss"}
        assert set(item["head_predicted"]) == {"localizer"}
    with np.load(scoremap_path(reference, "test")) as archive:
        assert archive["map_0"].dtype == np.float32 and archive["map_0"].ndim == 2


def test_maps_of_another_split_or_an_incomplete_archive_are_refused(reference, tmp_path, capsys):
    path = scoremap_path(reference, "test")
    assert (
        evaluate.main(["--exp", str(reference), "--split", "valid", "--scoremaps", str(path)]) == 1
    )
    assert "the score maps belong to another split or fold" in capsys.readouterr().err
    items = list(read_scoremaps(path))
    partial = tmp_path / "partial.npz"
    with scoremap_writer(partial, [item["image"] for item in items]) as add:
        for item in items[:-1]:
            add(item)
    assert evaluate.main(["--exp", str(reference), "--scoremaps", str(partial)]) == 1
    assert f"{partial} holds {len(items) - 1} of the {len(items)} images" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    assert evaluate.main(["--exp", str(reference), "--scoremaps", str(tmp_path / "junk.npz")]) == 1
    assert "is not a score-map archive" in capsys.readouterr().err
    assert evaluate.main(["--exp", str(reference), "--scoremaps", str(tmp_path / "none.npz")]) == 1
    assert "score maps not found" in capsys.readouterr().err


def test_a_writer_that_fails_leaves_nothing(tmp_path):
    path = tmp_path / "test_scoremaps.npz"
    item = {
        "index": 0,
        "label": 1,
        "predicted": 0,
        "probability": 0.75,
        "losses": {"loss": 0.5},
        "head_predicted": {},
        "mask": torch.full((1, 3, 4), 0.25),
    }
    with pytest.raises(RuntimeError), scoremap_writer(path, ["a.png"]) as add:
        add(item)
        raise RuntimeError("stopped")
    assert list(tmp_path.iterdir()) == []
    with scoremap_writer(path, ["a.png"]) as add:
        add(item)
    (stored,) = read_scoremaps(path)
    assert stored["image"] == "a.png" and stored["losses"] == {"loss": 0.5}
    assert torch.equal(stored["mask"], item["mask"]) and stored["probability"] == 0.75


def test_cub_boxes_are_read_as_inclusive_pixel_boxes(tmp_path):
    folder = tmp_path / "CUB_200_2011"
    folder.mkdir()
    (folder / "images.txt").write_text("1 001.A/a_1.jpg\n2 002.B/b_2.jpg\n")
    (folder / "bounding_boxes.txt").write_text("1 60.0 27.0 325.0 304.0\n2 0.0 5.5 10.0 20.0\n")
    boxes = evaluate.cub_boxes(tmp_path)
    assert boxes["CUB_200_2011/images/001.A/a_1.jpg"].tolist() == [[60, 27, 384, 330]]
    assert boxes["CUB_200_2011/images/002.B/b_2.jpg"].tolist() == [[0, 5, 9, 24]]
    assert evaluate.cub_boxes(tmp_path / "elsewhere") is None
    (folder / "bounding_boxes.txt").write_text("3 1 2 3 4\n")
    with pytest.raises(ValueError, match=r"bounding_boxes.txt:1: expected"):
        evaluate.cub_boxes(tmp_path)


def test_rescoring_a_copied_folder_with_another_data_root(reference, dataset, tmp_path):
    folder = shutil.copytree(reference, tmp_path / "copy")
    out = tmp_path / "again.json"
    data_root = str(dataset / "data")
    assert evaluate.main(["--exp", str(folder), "--data-root", data_root, "--out", str(out)]) == 0
    assert (
        json.loads(out.read_text())["f1_pos"]
        == json.loads((reference / "final_metrics.json").read_text())["test"]["f1_pos"]
    )
