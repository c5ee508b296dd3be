"""Tests of the data pipeline on tiny hand-made datasets written in the real on-disk layout."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import loader
import reproducibility
import train_deepmil
from deepmil.config import ConfigError, default_values, merge_sections
from deepmil.geometry import Geometry, compute_geometry
from deepmil.registry import dataset_spec

GLAS_SUBFOLDER = "GlaS-2015/Warwick QU Dataset (Released 2016_07_08)"


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_config(tmp_path: Path, dataset: str = "synthetic", **overrides) -> dict:
    config = {
        "dataset": dataset,
        "data_root": str(tmp_path / "data"),
        "fold_folder": str(tmp_path / "folds"),
        "fold_name": None,
        "split": 0,
        "fold": 0,
        "name_classes": {"class_0": 0, "class_1": 1},
        "model": {"num_classes": 2},
        "crop_size": [16, 16],
        "padding_size": [0.5, 0.5],
        "padding_mode": "reflect",
        "up_scale_small_dim_to": None,
        "MYSEED": 0,
    }
    config.update(overrides)
    return merge_sections(default_values(), config)


def write_samples(config: dict, split: str, samples: list, ext: str = "png") -> Path:
    """Write (name, image array, mask array, class) samples and their fold CSV; return the CSV path."""
    root = Path(config["data_root"]) / dataset_spec(config["dataset"]).folder
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for name, image, mask, label in samples:
        Image.fromarray(image).save(root / "images" / f"{name}.{ext}")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{name}.png")
        lines.append(f"images/{name}.{ext},masks/{name}.png,{label}\n")
    return write_csv(config, split, "".join(lines))


def write_csv(config: dict, split: str, text: str) -> Path:
    folder = loader.fold_dir(loader.DataConfig.from_config(config))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}_s_0_f_0.csv"
    path.write_text(text)
    return path


def synthetic_samples(count: int, size: int = 20) -> list:
    return [
        (
            f"img_{i}",
            random_image(size, size, i),
            (random_image(size, size, 100 + i)[..., 0] > 128).astype(np.uint8) * 255,
            f"class_{i % 2}",
        )
        for i in range(count)
    ]


@pytest.fixture
def synthetic_config(tmp_path):
    config = make_config(tmp_path)
    write_samples(config, "train", synthetic_samples(6))
    return config


# ----------------------------------------------------------------------------- geometry


def test_train_padding_glas_like():
    assert loader.train_padding(21, 30, (0.5, 0.5)) == (10, 10, 15, 15)
    assert loader.train_padding(522, 775, (0.5, 0.5)) == (261, 261, 387, 387)
    assert loader.train_padding(21, 30, None) == (0, 0, 0, 0)


def test_training_pad_is_reflection():
    rows, cols = np.meshgrid(np.arange(21), np.arange(30), indexing="ij")
    coded = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    padded = np.asarray(loader.pad_image(Image.fromarray(coded), (10, 10, 15, 15), "reflect"))
    assert padded.shape == (41, 60, 3)
    assert np.array_equal(padded[10:31, 15:45], coded)
    for k in range(1, 11):
        assert np.array_equal(padded[10 - k, 15:45], coded[k])
        assert np.array_equal(padded[30 + k, 15:45], coded[20 - k])
    for k in range(1, 16):
        assert np.array_equal(padded[10:31, 15 - k], coded[:, k])
        assert np.array_equal(padded[10:31, 44 + k], coded[:, 29 - k])


def test_random_crop_stays_inside_and_reaches_every_position():
    rows, cols = np.meshgrid(np.arange(41), np.arange(60), indexing="ij")
    coded = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    image = Image.fromarray(coded)
    tops, lefts = set(), set()
    for index in range(600):
        crop = np.asarray(
            loader.random_crop(image, (16, 16), reproducibility.sample_generator(0, 0, index))
        )
        top, left = int(crop[0, 0, 0]), int(crop[0, 0, 1])
        assert np.array_equal(crop, coded[top : top + 16, left : left + 16])
        tops.add(top)
        lefts.add(left)
    assert tops == set(range(41 - 16 + 1))
    assert lefts == set(range(60 - 16 + 1))


def test_glas_training_sample_uses_padded_size(tmp_path):
    config = make_config(
        tmp_path, "glas", name_classes={"benign": 0, "malignant": 1}, crop_size=[41, 60]
    )
    write_samples(
        config,
        "train",
        [("train_1", random_image(21, 30, 0), np.zeros((21, 30), np.uint8), "benign")],
        ext="bmp",
    )
    sample = loader.build_dataset(loader.DataConfig.from_config(config), "train", train=True)[0]
    assert sample["image"].shape == (3, 41, 60)
    assert sample["image"].min() >= -1 and sample["image"].max() <= 1
    assert set(sample) == {"image", "label", "index"}
    config["crop_size"] = [42, 60]
    with pytest.raises(ValueError, match="train_1.bmp"):
        loader.build_dataset(loader.DataConfig.from_config(config), "train", train=True)


def test_cub_geometry_and_samples_after_upscale(tmp_path):
    config = make_config(
        tmp_path,
        "Caltech-UCSD-Birds-200-2011",
        name_classes={"a": 0, "b": 1},
        crop_size=[499, 970],
        padding_size=None,
        up_scale_small_dim_to=500,
    )
    image = random_image(103, 200, 3)
    write_samples(
        config, "test", [("bird", image, np.full((103, 200), 200, np.uint8), "b")], ext="jpg"
    )
    evaluation = loader.build_dataset(loader.DataConfig.from_config(config), "test", train=False)
    assert evaluation.geometry[0] == Geometry(
        original=(103, 200), upscaled=(499, 970), padded=(512, 992), padding=(6, 7, 11, 11)
    )
    sample = evaluation[0]
    assert sample["image"].shape == (3, 512, 992)
    assert torch.equal(sample["mask"], torch.ones(1, 103, 200))
    stored = Image.open(
        Path(config["data_root"]) / "Caltech-UCSD-Birds-200-2011" / "images" / "bird.jpg"
    )
    upscaled = loader.to_normalized_tensor(
        stored.convert("RGB").resize((970, 499), Image.Resampling.BILINEAR)
    )
    assert torch.equal(sample["image"][:, 6:505, 11:981], upscaled)
    training = loader.build_dataset(loader.DataConfig.from_config(config), "test", train=True)
    flips = set()
    for epoch in range(8):
        training.set_epoch(epoch)
        crop = training[0]["image"]
        flipped = torch.equal(crop, upscaled.flip(-1))
        assert flipped or torch.equal(crop, upscaled)
        flips.add(flipped)
    assert flips == {True, False}


def test_evaluation_padding_is_reflection(tmp_path):
    config = make_config(tmp_path, "glas", name_classes={"benign": 0, "malignant": 1})
    image = random_image(40, 775, 5)
    mask = np.zeros((40, 775), np.uint8)
    mask[5:10, 100:200] = 2
    write_samples(config, "valid", [("testA_1", image, mask, "malignant")], ext="bmp")
    dataset = loader.build_dataset(loader.DataConfig.from_config(config), "valid", train=False)
    assert dataset.geometry[0] == Geometry((40, 775), (40, 775), (64, 800), (12, 12, 12, 13))
    sample = dataset[0]
    out = sample["image"]
    assert out.shape == (3, 64, 800)
    expected = torch.from_numpy(image).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    assert torch.equal(out[:, 12:52, 12:787], expected)
    for j in range(1, 13):
        assert torch.equal(out[:, 12:52, 12 - j], expected[:, :, j])
        assert torch.equal(out[:, 12 - j, 12:787], expected[:, j])
        assert torch.equal(out[:, 51 + j, 12:787], expected[:, 39 - j])
    for j in range(1, 14):
        assert torch.equal(out[:, 12:52, 786 + j], expected[:, :, 774 - j])
    assert sample["label"] == 1 and sample["index"] == 0
    assert sample["mask"].shape == (1, 40, 775)
    assert torch.equal(sample["mask"][0], torch.from_numpy((mask != 0).astype(np.float32)))


# ----------------------------------------------------------------------------- masks


def test_binarize_mask_thresholds():
    values = np.array([0, 1, 127, 128, 255], np.uint8)
    assert binarized(values, "Caltech-UCSD-Birds-200-2011") == [0, 0, 0, 1, 1]
    for dataset in ("glas", "Oxford-flowers-102", "synthetic"):
        assert binarized(values, dataset) == [0, 1, 1, 1, 1]


def binarized(values: np.ndarray, dataset: str) -> list[int]:
    threshold = dataset_spec(dataset).mask_threshold
    return loader.binarize_mask(values, threshold).astype(int).tolist()


@pytest.mark.parametrize(
    "dataset, expected",
    [("Caltech-UCSD-Birds-200-2011", [[0, 0], [1, 1]]), ("Oxford-flowers-102", [[0, 1], [1, 1]])],
)
def test_dataset_masks_are_binarised_at_original_size(tmp_path, dataset, expected):
    config = make_config(tmp_path, dataset, name_classes={"0": 0, "1": 1}, padding_size=None)
    mask = (
        np.array([[0, 1], [127, 128]], np.uint8)
        if dataset.startswith("Oxford")
        else np.array([[0, 127], [128, 255]], np.uint8)
    )
    write_samples(config, "test", [("m", random_image(2, 2, 0), mask, "1")])
    for preload in (False, True):
        sample = loader.build_dataset(
            loader.DataConfig.from_config(config), "test", train=False, preload=preload
        )[0]
        assert sample["mask"].dtype == torch.float32
        assert sample["mask"].tolist() == [expected]


# ----------------------------------------------------------------------------- reproducibility


def epoch_batches(config: dict, num_workers: int, preload: bool, epochs: int = 2) -> list:
    dataset = loader.build_dataset(
        loader.DataConfig.from_config(config), "train", train=True, preload=preload
    )
    data = loader.make_loader(
        dataset, batch_size=4, num_workers=num_workers, shuffle=True, seed=config["MYSEED"]
    )
    batches = []
    for epoch in range(epochs):
        loader.set_loader_epoch(data, epoch)
        batches.append(
            [(batch["index"].tolist(), batch["label"].tolist(), batch["image"]) for batch in data]
        )
    return batches


def assert_same_batches(first: list, second: list) -> None:
    assert len(first) == len(second)
    for (idx_a, lab_a, img_a), (idx_b, lab_b, img_b) in zip(first, second):
        assert idx_a == idx_b and lab_a == lab_b
        assert torch.equal(img_a, img_b)


def test_training_batches_independent_of_workers_and_preload(synthetic_config):
    reference = epoch_batches(synthetic_config, num_workers=0, preload=True)
    for num_workers, preload in ((2, True), (0, False), (2, False)):
        other = epoch_batches(synthetic_config, num_workers=num_workers, preload=preload)
        for epoch in range(2):
            assert_same_batches(reference[epoch], other[epoch])
    order = [[i for idx, _, _ in epoch for i in idx] for epoch in reference]
    assert sorted(order[0]) == sorted(order[1]) == list(range(6))
    assert order[0] != order[1]
    images = [
        {i: image for idx, _, batch in epoch for i, image in zip(idx, batch)} for epoch in reference
    ]
    assert all(not torch.equal(images[0][i], images[1][i]) for i in range(6))


def test_evaluation_samples_independent_of_preload(synthetic_config):
    write_samples(synthetic_config, "valid", synthetic_samples(3, size=21))
    lazy = loader.build_dataset(
        loader.DataConfig.from_config(synthetic_config), "valid", train=False, preload=False
    )
    eager = loader.build_dataset(
        loader.DataConfig.from_config(synthetic_config), "valid", train=False, preload=True
    )
    for index in range(3):
        assert torch.equal(lazy[index]["image"], eager[index]["image"])
        assert torch.equal(lazy[index]["mask"], eager[index]["mask"])


def test_sample_depends_only_on_seed_epoch_index(synthetic_config):
    first = loader.build_dataset(
        loader.DataConfig.from_config(synthetic_config), "train", train=True
    )
    second = loader.build_dataset(
        loader.DataConfig.from_config(synthetic_config), "train", train=True
    )
    first.set_epoch(3)
    expected = {index: first[index]["image"] for index in (4, 1, 3)}
    second.set_epoch(0)
    second[2]
    second.set_epoch(3)
    for index in (3, 3, 1, 4):
        assert torch.equal(second[index]["image"], expected[index])
    reseeded = loader.build_dataset(
        loader.DataConfig.from_config(dict(synthetic_config, MYSEED=1)), "train", train=True
    )
    reseeded.set_epoch(3)
    assert not torch.equal(reseeded[4]["image"], expected[4])


def test_loader_leaves_global_rng_untouched(synthetic_config):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    data = loader.make_loader(
        loader.build_dataset(loader.DataConfig.from_config(synthetic_config), "train", train=True),
        4,
        0,
        True,
        0,
    )
    loader.set_loader_epoch(data, 1)
    list(data)
    assert torch.equal(torch.rand(3), expected)


def test_distributed_ranks_partition_the_dataset(synthetic_config):
    dataset = loader.build_dataset(
        loader.DataConfig.from_config(synthetic_config), "train", train=True
    )
    seen = []
    for rank in range(2):
        data = loader.make_loader(dataset, 2, 0, True, 0, rank=rank, world_size=2)
        loader.set_loader_epoch(data, 0)
        seen.append([i for batch in data for i in batch["index"].tolist()])
    assert len(seen[0]) == len(seen[1]) == 3
    assert sorted(seen[0] + seen[1]) == list(range(6))


def test_evaluation_loader_is_sequential_and_collates_masks(synthetic_config):
    write_samples(synthetic_config, "test", synthetic_samples(3))
    dataset = loader.build_dataset(
        loader.DataConfig.from_config(synthetic_config), "test", train=False
    )
    batches = list(loader.make_loader(dataset, 2, 0, False, 0))
    assert [batch["index"].tolist() for batch in batches] == [[0, 1], [2]]
    first = batches[0]
    assert first["label"].dtype == torch.long and first["label"].tolist() == [0, 1]
    assert first["image"].shape == (2, 3, 32, 32)
    assert isinstance(first["mask"], list) and len(first["mask"]) == 2
    assert torch.equal(first["mask"][1], dataset[1]["mask"])


# ----------------------------------------------------------------------------- paths, CSV, encodings


def test_fold_dir_and_dataset_root(tmp_path):
    config = make_config(
        tmp_path,
        "Caltech-UCSD-Birds-200-2011",
        fold_name="Caltech-UCSD-Birds-200-2011-CUB5",
        split=1,
        fold=3,
    )
    assert (
        loader.fold_dir(loader.DataConfig.from_config(config))
        == tmp_path / "folds" / "Caltech-UCSD-Birds-200-2011-CUB5" / "split_1" / "fold_3"
    )
    glas = make_config(tmp_path, "glas")
    (tmp_path / "data" / GLAS_SUBFOLDER).mkdir(parents=True)
    assert (
        loader.dataset_root(loader.DataConfig.from_config(glas))
        == tmp_path / "data" / GLAS_SUBFOLDER
    )
    assert dataset_spec("Oxford-flowers-102").folds == {"oxf": "Oxford-flowers-102"}
    with pytest.raises(ValueError, match="bach"):
        dataset_spec("bach")


def test_missing_data_root_names_path_and_options(tmp_path):
    config = make_config(tmp_path, data_root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as error:
        loader.dataset_root(loader.DataConfig.from_config(config))
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "synthetic") in message
    assert "--data-root" in message and "DEEPMIL_DATA_ROOT" in message


def test_read_fold_csv_quotechar(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("|a,b.png|,m.png,019.Gray_Catbird\nc.png,d.png,71\n")
    assert loader.read_fold_csv(path) == [
        loader.FoldRow("a,b.png", "m.png", "019.Gray_Catbird"),
        loader.FoldRow("c.png", "d.png", "71"),
    ]


def test_load_encoding_from_yaml(tmp_path):
    (tmp_path / "encoding.yaml").write_text("{'0': 0, '1': 1, '10': 2}\n")
    assert loader.load_encoding("encoding.yaml", tmp_path) == {"0": 0, "1": 1, "10": 2}
    (tmp_path / "ints.yaml").write_text("{0: 1, 1: 0}\n")
    assert loader.load_encoding("ints.yaml", tmp_path) == {"0": 1, "1": 0}
    assert loader.load_encoding({"benign": 0, "malignant": 1}, tmp_path) == {
        "benign": 0,
        "malignant": 1,
    }
    (tmp_path / "gap.yaml").write_text("{a: 0, b: 2}\n")
    with pytest.raises(ValueError, match="gap.yaml"):
        loader.load_encoding("gap.yaml", tmp_path)
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        loader.load_encoding("absent.yaml", tmp_path)


def test_encoding_file_in_fold_folder(tmp_path):
    config = make_config(
        tmp_path,
        "Oxford-flowers-102",
        name_classes="encoding.yaml",
        padding_size=None,
        model={"num_classes": 3},
    )
    write_samples(config, "valid", [("f", random_image(4, 4, 0), np.zeros((4, 4), np.uint8), "2")])
    (loader.fold_dir(loader.DataConfig.from_config(config)) / "encoding.yaml").write_text(
        "{'0': 0, '1': 1, '2': 2}\n"
    )
    assert loader.build_dataset(
        loader.DataConfig.from_config(config), "valid", train=False
    ).labels == [2]


# ----------------------------------------------------------------------------- errors


def test_missing_csv_is_named(synthetic_config):
    with pytest.raises(FileNotFoundError, match="valid_s_0_f_0.csv"):
        loader.build_dataset(loader.DataConfig.from_config(synthetic_config), "valid", train=False)


def test_empty_csv_is_named(synthetic_config):
    path = write_csv(synthetic_config, "valid", "")
    with pytest.raises(ValueError, match="empty") as error:
        loader.build_dataset(loader.DataConfig.from_config(synthetic_config), "valid", train=False)
    assert str(path) in str(error.value)


def test_bad_column_count_names_line(synthetic_config):
    path = write_csv(
        synthetic_config,
        "valid",
        "images/img_0.png,masks/img_0.png,class_0\nimages/img_1.png,class_1\n",
    )
    with pytest.raises(ValueError, match="line 2") as error:
        loader.build_dataset(loader.DataConfig.from_config(synthetic_config), "valid", train=False)
    assert str(path) in str(error.value) and "got 2" in str(error.value)


def test_unknown_class_names_line(synthetic_config):
    path = write_csv(
        synthetic_config,
        "valid",
        "images/img_0.png,masks/img_0.png,class_0\nimages/img_1.png,masks/img_1.png,class_1\n"
        "images/img_2.png,masks/img_2.png,class_9\n",
    )
    with pytest.raises(ValueError, match="line 3") as error:
        loader.build_dataset(loader.DataConfig.from_config(synthetic_config), "valid", train=False)
    assert str(path) in str(error.value) and "class_9" in str(error.value)


def test_missing_image_names_file_and_csv(synthetic_config):
    path = write_csv(
        synthetic_config,
        "valid",
        "images/img_0.png,masks/img_0.png,class_0\nimages/gone.png,masks/img_1.png,class_1\n",
    )
    with pytest.raises(FileNotFoundError) as error:
        loader.build_dataset(loader.DataConfig.from_config(synthetic_config), "valid", train=False)
    assert (
        "gone.png" in str(error.value)
        and str(path) in str(error.value)
        and "line 2" in str(error.value)
    )


def test_truncated_png_is_named(synthetic_config):
    image_path = Path(synthetic_config["data_root"]) / "synthetic" / "images" / "img_1.png"
    image_path.write_bytes(image_path.read_bytes()[:200])
    with pytest.raises(ValueError, match="img_1.png"):
        loader.build_dataset(
            loader.DataConfig.from_config(synthetic_config), "train", train=True, preload=True
        )
    lazy = loader.build_dataset(
        loader.DataConfig.from_config(synthetic_config), "train", train=True, preload=False
    )
    lazy[0]
    with pytest.raises(ValueError, match="img_1.png"):
        lazy[1]


def test_mask_size_mismatch_names_both_files(synthetic_config):
    mask_path = Path(synthetic_config["data_root"]) / "synthetic" / "masks" / "img_2.png"
    Image.fromarray(np.zeros((20, 19), np.uint8), mode="L").save(mask_path)
    with pytest.raises(ValueError) as error:
        loader.build_dataset(loader.DataConfig.from_config(synthetic_config), "train", train=True)
    message = str(error.value)
    assert "masks/img_2.png" in message and "images/img_2.png" in message
    assert "(20, 19)" in message and "(20, 20)" in message


def test_encoding_class_count_must_match_model(synthetic_config):
    synthetic_config["model"]["num_classes"] = 3
    with pytest.raises(ValueError, match="2 classes but model.num_classes is 3"):
        loader.build_dataset(loader.DataConfig.from_config(synthetic_config), "train", train=True)


def test_batched_evaluation_needs_images_of_one_size():
    same = SimpleNamespace(geometry=[compute_geometry(64, 64, None)] * 3)
    train_deepmil.check_batchable(same, 4, "test")
    mixed = SimpleNamespace(
        geometry=[compute_geometry(64, 64, None), compute_geometry(80, 64, None)]
    )
    train_deepmil.check_batchable(mixed, 1, "test")
    with pytest.raises(ConfigError, match=r"eval_batch_size = 4: the test images come in 2 sizes"):
        train_deepmil.check_batchable(mixed, 4, "test")
