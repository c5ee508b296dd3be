"""The real-dataset readers end to end, on miniature replicas written in the real on-disk layout.

Each replica (GlaS, CUB-200-2011 with its CUB5 subset, Oxford Flowers 102) has the real folder
names, metadata files and file formats but only a few tiny images. ``create_folds.py`` splits it in
a subprocess, then the paper's configurations read it through ``loader.build_dataset``: labels,
binarised evaluation masks at the original size, short-side up-scaling, evaluation padding to a
multiple of 32 and training crops are all checked against the files the test wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from scipy import io as sio

import loader
from deepmil.geometry import Geometry
from helpers import REPO, run_cli
from tools import get_yaml_args

GLAS_FOLDER = "GlaS-2015/Warwick QU Dataset (Released 2016_07_08)"
CUB_FOLDER = "Caltech-UCSD-Birds-200-2011"
CUB5_FOLD_NAME = "Caltech-UCSD-Birds-200-2011-CUB5"
OXF_FOLDER = "Oxford-flowers-102"
GLAS_HEADER = "name,patient ID,grade (GlaS),grade (Sirinukunwattana et al. 2015)"
CSV_NAMES = ("train_s_0_f_0.csv", "valid_s_0_f_0.csv", "test_s_0_f_0.csv")


# ----------------------------------------------------------------------------- helpers


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """A noisy RGB image: every small patch is unique, so a crop can be located exactly."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def run_create_folds(dataset: str, data_root: Path, out: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "create_folds.py",
        "--dataset",
        dataset,
        "--data-root",
        str(data_root),
        "--out",
        str(out),
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def read_rows(fold_dir: Path, name: str) -> list[tuple[str, str, str]]:
    """Rows of a fold CSV, checking the published format (LF endings, 3 columns, no quoting)."""
    content = (fold_dir / name).read_bytes()
    assert b"\r" not in content and b"|" not in content and content.endswith(b"\n")
    rows = [tuple(line.split(",")) for line in content.decode().splitlines()]
    assert all(len(row) == 3 for row in rows)
    return rows


def paper_config(yaml_name: str, data_root: Path, folds: Path, *sets: str) -> dict:
    """A shipped configuration with the replica's folders and ``--set`` overrides."""
    argv = ["--yaml", yaml_name, "--data-root", str(data_root), "--set", f"fold_folder={folds}"]
    for assignment in sets:
        argv += ["--set", assignment]
    config, _ = get_yaml_args(argv)
    return config


def normalized(array: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float, (x / 255 - 0.5) / 0.5."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()
    return tensor.div(255).sub(0.5).div(0.5)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of ``normalized`` (exact on 8-bit values)."""
    return tensor.mul(0.5).add(0.5).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def eval_expected(array: np.ndarray, upscaled: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    """The evaluation input: bilinear PIL resize to ``upscaled`` (h, w), then reflect padding to
    the next multiple of 32 (floor half before, the rest after); returns (array, padding)."""
    height, width = upscaled
    if array.shape[:2] != (height, width):
        array = np.asarray(
            Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR)
        )
    pads = []
    for size in (height, width):
        leftover = -size % 32
        pads.append((leftover // 2, leftover - leftover // 2))
    padded = np.pad(array, (pads[0], pads[1], (0, 0)), mode="reflect")
    return padded, (*pads[0], *pads[1])


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """The documented rule: if the short side is below ``short_side``, scale by ``short_side /
    min(h, w)`` and truncate each side (in double precision)."""
    if min(height, width) >= short_side:
        return height, width
    ratio = short_side / min(height, width)
    return int(height * ratio), int(width * ratio)


def crop_positions(canvas: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where ``crop`` is exactly a window of ``canvas``."""
    height, width = crop.shape[:2]
    limit_h, limit_w = canvas.shape[0] - height + 1, canvas.shape[1] - width + 1
    if limit_h <= 0 or limit_w <= 0:
        return []
    patch = crop[:4, :4]
    windows = sliding_window_view(canvas, patch.shape)[:limit_h, :limit_w, 0]
    candidates = np.argwhere((windows == patch).all(axis=(2, 3, 4)))
    return [
        (int(top), int(left))
        for top, left in candidates
        if np.array_equal(canvas[top : top + height, left : left + width], crop)
    ]


def decoded(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------- GlaS replica

GLAS_BENIGN_TRAIN = (1, 3, 4, 7, 9)
GLAS_GRADES = {
    f"train_{k}": "benign" if k in GLAS_BENIGN_TRAIN else "malignant" for k in range(1, 12)
}
GLAS_GRADES.update(
    {
        "testA_1": "malignant",
        "testA_2": "benign",
        "testA_3": "benign",
        "testB_1": "malignant",
        "testB_2": "benign",
    }
)
GLAS_LABELS = {"benign": 0, "malignant": 1}


def glas_size(index: int) -> tuple[int, int]:
    return 40 + 4 * (index % 3), 52 + 6 * (index % 4)


def build_glas(
    data_root: Path, grades: dict[str, str] = GLAS_GRADES, size=glas_size
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BMP images, BMP instance masks (0 = background, 1, 2, ... = gland ids) and Grade.csv."""
    folder = data_root / GLAS_FOLDER
    folder.mkdir(parents=True)
    written = {}
    lines = [GLAS_HEADER]
    for index, name in enumerate(sorted(grades)):  # Grade.csv lists names in this order
        height, width = size(index)
        image = texture(height, width, index)
        mask = np.zeros((height, width), np.uint8)
        mask[2:12, 3:20] = 1
        mask[15:30, 21:30] = 2
        mask[height - 8 : height - 2, 1:6] = index + 3
        Image.fromarray(image).save(folder / f"{name}.bmp")
        Image.fromarray(mask, mode="L").save(folder / f"{name}_anno.bmp")
        written[name] = (image, mask)
        grade = grades[name]
        detail = "adenomatous" if grade == "benign" else "moderately differentiated"
        lines.append(f"{name},{index % 7 + 1}, {grade}, {detail}")
    (folder / "Grade.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return written


def replica_with_folds(tmp_path_factory, dataset: str, build) -> tuple:
    """A miniature replica built by ``build(data_root)``, then its folds from create_folds.py:
    ``(folder, what build returned, the create_folds.py result)``."""
    tmp = tmp_path_factory.mktemp(dataset)
    built = build(tmp / "data")
    result = run_create_folds(dataset, tmp / "data", tmp / "folds")
    assert result.returncode == 0, result.stderr
    return tmp, built, result


@pytest.fixture(scope="module")
def glas(tmp_path_factory):
    return replica_with_folds(tmp_path_factory, "glas", build_glas)


def glas_config(tmp: Path, *sets: str) -> dict:
    return paper_config(
        "glas-no-erasing.yaml",
        tmp / "data",
        tmp / "folds",
        "crop_size=[48, 48]",
        "model.kmax=1.0",
        *sets,
    )


def test_glas_folds_from_grade_csv(glas):
    tmp, _, result = glas
    fold_dir = tmp / "folds" / "glas" / "split_0" / "fold_0"
    assert "wrote" in result.stdout and "train 8, valid 3, test 5" in result.stdout
    assert "0 of 3 files match the published digests" in result.stdout
    assert "are expected to differ; that is not an error" in result.stdout
    train, valid, test = (read_rows(fold_dir, name) for name in CSV_NAMES)
    for image, mask, grade in train + valid + test:
        name = image[: -len(".bmp")]
        assert image.endswith(".bmp") and mask == f"{name}_anno.bmp"
        assert grade == GLAS_GRADES[name]  # " benign" in Grade.csv, stripped
    # Validation: ceil(20 %) per class, malignant first (2 of 6), then benign (1 of 5).
    assert [row[2] for row in valid] == ["malignant", "malignant", "benign"]
    trained = sorted(row[0] for row in train + valid)
    assert trained == sorted(f"{name}.bmp" for name in GLAS_GRADES if name.startswith("train"))
    assert [row[0] for row in test] == [
        "testA_1.bmp",
        "testA_2.bmp",
        "testA_3.bmp",
        "testB_1.bmp",
        "testB_2.bmp",
    ]
    assert (fold_dir / "seed.txt").read_text() == "MYSEED: 0"
    assert not (fold_dir / "encoding.yaml").exists()


def test_glas_evaluation_samples(glas):
    tmp, written, _ = glas
    config = glas_config(tmp)
    assert config["padding_size"] == [0.5, 0.5] and config["up_scale_small_dim_to"] is None
    assert config["name_classes"] == GLAS_LABELS
    fold_dir = loader.fold_dir(loader.DataConfig.from_config(config))
    assert fold_dir == tmp / "folds" / "glas" / "split_0" / "fold_0"
    for split in ("valid", "test"):
        rows = read_rows(fold_dir, f"{split}_s_0_f_0.csv")
        dataset = loader.build_dataset(loader.DataConfig.from_config(config), split, train=False)
        assert len(dataset) == len(rows)
        for index, (image_name, _, _) in enumerate(rows):
            name = image_name[: -len(".bmp")]
            image, mask = written[name]
            sample = dataset[index]
            assert sample["label"] == GLAS_LABELS[GLAS_GRADES[name]] and sample["index"] == index
            expected, padding = eval_expected(image, image.shape[:2])
            assert dataset.geometry[index] == Geometry(
                image.shape[:2], image.shape[:2], expected.shape[:2], padding
            )
            assert expected.shape[0] % 32 == 0 and expected.shape[1] % 32 == 0
            assert torch.equal(sample["image"], normalized(expected))
            # Every gland id (1, 2 and the larger ones) is foreground; the mask keeps the
            # original size.
            assert sample["mask"].shape == (1, *image.shape[:2])
            assert torch.equal(sample["mask"][0], torch.from_numpy((mask != 0).astype(np.float32)))
            assert sample["mask"].sum() == 10 * 17 + 15 * 9 + 6 * 5
    test = loader.build_dataset(loader.DataConfig.from_config(config), "test", train=False)
    assert test.geometry[0] == Geometry((40, 52), (40, 52), (64, 64), (12, 12, 6, 6))


def test_glas_training_crops_come_from_the_reflect_padded_image(glas, monkeypatch):
    tmp, written, _ = glas
    config = glas_config(tmp)
    rows = read_rows(loader.fold_dir(loader.DataConfig.from_config(config)), CSV_NAMES[0])
    dataset = loader.build_dataset(loader.DataConfig.from_config(config), "train", train=True)
    jittered = dataset[0]["image"]
    # Without the colour jitter, a crop is a 48x48 window of the image reflect-padded by
    # int(0.5 * h) / int(0.5 * w), possibly flipped horizontally and/or vertically.
    monkeypatch.setattr(loader, "color_jitter", lambda image, generator: image)
    unflipped = flipped = 0
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for index, (image_name, _, grade) in enumerate(rows):
            sample = dataset[index]
            assert sample["label"] == GLAS_LABELS[grade]
            assert sample["image"].shape == (3, 48, 48)
            image = written[image_name[: -len(".bmp")]][0]
            height, width = image.shape[:2]
            padded = np.pad(image, ((height // 2,) * 2, (width // 2,) * 2, (0, 0)), mode="reflect")
            crop = to_uint8(sample["image"])
            flips = [
                flip
                for flip in ("none", "h", "v", "hv")
                if crop_positions(
                    padded[:, ::-1] if "h" in flip else padded, crop[::-1] if "v" in flip else crop
                )
            ]
            # Reflection makes some windows equal to flipped ones: ask for at least one match.
            assert flips, (image_name, epoch)
            unflipped += "none" in flips
            flipped += "none" not in flips
            if epoch == 0 and index == 0:
                assert not torch.equal(sample["image"], jittered)
    assert unflipped > 0 and flipped > 0


def test_glas_missing_data_and_folds_are_explained(glas, tmp_path):
    tmp, _, _ = glas
    nowhere = tmp_path / "nowhere"
    config = paper_config(
        "glas-no-erasing.yaml", nowhere, tmp / "folds", "crop_size=[48, 48]", "model.kmax=1.0"
    )
    for folds in (tmp / "folds", tmp_path / "no-folds"):
        config["fold_folder"] = str(folds)
        with pytest.raises(FileNotFoundError) as error:
            loader.build_dataset(loader.DataConfig.from_config(config), "train", train=True)
        message = str(error.value)
        assert f"dataset folder not found: {nowhere / GLAS_FOLDER}" in message
        assert f"download it with: bash download-glas-dataset.sh {nowhere}" in message
        assert "--data-root" in message and "DEEPMIL_DATA_ROOT" in message
    config = glas_config(tmp, f"fold_folder={tmp_path / 'no-folds'}")
    with pytest.raises(FileNotFoundError) as error:
        loader.build_dataset(loader.DataConfig.from_config(config), "valid", train=False)
    csv_path = tmp_path / "no-folds" / "glas" / "split_0" / "fold_0" / "valid_s_0_f_0.csv"
    assert f"fold CSV not found: {csv_path}" in str(error.value)
    assert (
        f"python create_folds.py --dataset glas --data-root {tmp / 'data'} "
        f"--out {tmp_path / 'no-folds'}"
    ) in str(error.value)
    result = run_create_folds("glas", nowhere, tmp_path / "folds")
    assert result.returncode == 1
    assert str(nowhere / GLAS_FOLDER / "Grade.csv") in result.stderr


def test_glas_cli_with_the_readme_flags(tmp_path):
    """One epoch through train_deepmil.py on a smaller GlaS replica (32 x 32 images)."""
    grades = {f"train_{k}": ("benign", "malignant")[k % 2] for k in range(1, 7)}
    grades.update({"testA_1": "benign", "testB_1": "malignant"})
    build_glas(tmp_path / "data", grades, lambda index: (32, 32))
    assert run_create_folds("glas", tmp_path / "data", tmp_path / "folds").returncode == 0
    args = [
        "--cudaid",
        "cpu",
        "--yaml",
        "glas-no-erase.yaml",
        "--kmin",
        "1.0",
        "--kmax",
        "1.0",
        "--dout",
        "0.0",
        "--epoch",
        "1",
        "--nbrerase",
        "0",
        "--epocherase",
        "1",
        "--stepsize",
        "40",
        "--bsize",
        "8",
        "--modalities",
        "5",
        "--lr",
        "0.001",
        "--fold",
        "0",
        "--wdecay",
        "1e-05",
        "--alpha",
        "0.2",
        "--modelname",
        "resnet18",
        "--pretrained",
        "false",
        "--set",
        "num_workers=0",
        "--set",
        "crop_size=[32, 32]",
        "--set",
        f"fold_folder={tmp_path / 'folds'}",
        "--data-root",
        str(tmp_path / "data"),
        "--exp-root",
        str(tmp_path / "exps"),
        "--quiet",
    ]
    # One intra-op thread: on a busy machine, competing threads make this tiny run several
    # times slower.
    result = run_cli(args, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    (folder,) = (tmp_path / "exps").iterdir()
    final = json.loads((folder / "final_metrics.json").read_text())
    assert final["best_epoch"] == 0
    assert final["valid"]["n_images"] == 2 and final["test"]["n_images"] == 2
    assert final["train_eval"]["n_images"] == 4
    for key in ("cl_error", "f1_pos", "f1_neg"):
        assert 0.0 <= final["test"][key] <= 100.0
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["dataset"] == "glas" and saved["yaml"] == "glas-no-erase.yaml"
    assert saved["model"]["name"] == "resnet18" and saved["model"]["alpha"] == 0.2
    assert saved["padding_size"] == [0.5, 0.5]


# ----------------------------------------------------------------------------- CUB replica

CUB_KNOWN = {
    1: "Black_footed_Albatross",
    19: "Gray_Catbird",
    99: "Ovenbird",
    108: "White_necked_Raven",
    171: "Myrtle_Warbler",
    178: "Swainson_Warbler",
    200: "Common_Yellowthroat",
}
CUB_CLASSES = [f"{i:03d}.{CUB_KNOWN.get(i, f'Species_{i:03d}')}" for i in range(1, 201)]
# create_folds draws indices [18, 170, 107, 98, 177] of the alphabetical class list (seed 0).
CUB5 = [
    "019.Gray_Catbird",
    "171.Myrtle_Warbler",
    "108.White_necked_Raven",
    "099.Ovenbird",
    "178.Swainson_Warbler",
]
CUB5_FLAGS = (1, 0, 1, 1, 1, 0, 1)  # 5 training and 2 test images, interleaved as in images.txt
# (class, position in the class) -> (height, width); the rest are 45 x 60 or 60 x 45.
CUB_SIZES = {
    ("019.Gray_Catbird", 1): (103, 140),
    ("019.Gray_Catbird", 0): (103, 140),
    ("099.Ovenbird", 5): (500, 520),
    ("171.Myrtle_Warbler", 2): (60, 45),
}
CUB_GREYS = (0, 100, 127, 128, 200, 255)


def cub_mask(height: int, width: int, seed: int) -> np.ndarray:
    """Grey-level mask averaged over annotators: bands of 0, 100, 127, 128, 200 and 255."""
    mask = np.zeros((height, width), np.uint8)
    columns = np.array_split(np.arange(width), len(CUB_GREYS))
    for grey, cols in zip(np.roll(CUB_GREYS, seed), columns):
        mask[height // 5 : height - 3, cols] = grey
    return mask


def build_cub(data_root: Path) -> dict[str, dict]:
    """classes.txt (200 classes), images.txt, image_class_labels.txt, train_test_split.txt, JPEG
    images and PNG segmentations; the CUB5 classes get 7 images, the others 1 or 2."""
    root = data_root / CUB_FOLDER
    meta = root / "CUB_200_2011"
    files = {}
    entries = []
    for class_id, class_name in enumerate(CUB_CLASSES, start=1):
        flags = CUB5_FLAGS if class_name in CUB5 else (1,) + (0,) * (class_id % 40 == 0)
        stem = class_name.split(".", 1)[1]
        (meta / "images" / class_name).mkdir(parents=True)
        (root / "segmentations" / class_name).mkdir(parents=True)
        for position, flag in enumerate(flags):
            relative = f"{class_name}/{stem}_{position + 1:04d}_{class_id * 100 + position}"
            default = (60, 45) if (class_id + position) % 3 == 0 else (45, 60)
            height, width = CUB_SIZES.get((class_name, position), default)
            seed = class_id * 10 + position
            image, mask = texture(height, width, seed), cub_mask(height, width, seed)
            Image.fromarray(image).save(meta / "images" / f"{relative}.jpg", quality=90)
            Image.fromarray(mask, mode="L").save(root / "segmentations" / f"{relative}.png")
            files[f"CUB_200_2011/images/{relative}.jpg"] = {
                "mask": mask,
                "class": class_name,
                "class_id": class_id,
                "train": bool(flag),
                "segmentation": f"segmentations/{relative}.png",
            }
            entries.append((relative, class_id, flag))
    numbered = list(enumerate(entries, start=1))
    tables = {
        "classes.txt": [f"{i} {name}" for i, name in enumerate(CUB_CLASSES, start=1)],
        "images.txt": [f"{i} {relative}.jpg" for i, (relative, _, _) in numbered],
        "image_class_labels.txt": [f"{i} {class_id}" for i, (_, class_id, _) in numbered],
        "train_test_split.txt": [f"{i} {flag}" for i, (_, _, flag) in numbered],
    }
    for name, lines in tables.items():
        (meta / name).write_text("".join(line + "\n" for line in lines))
    return files


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cub")
    files = build_cub(tmp / "data")
    results = {
        name: run_create_folds(name, tmp / "data", tmp / "folds") for name in ("cub", "cub5")
    }
    for result in results.values():
        assert result.returncode == 0, result.stderr
    return tmp, files, results


def test_cub_and_cub5_folds(cub):
    tmp, files, results = cub
    assert "train 20, valid 200, test 15" in results["cub"].stdout
    assert "train 20, valid 5, test 10" in results["cub5"].stdout
    full_encoding = {name: index for index, name in enumerate(CUB_CLASSES)}
    top = tmp / "folds" / CUB_FOLDER
    assert yaml.safe_load((top / "encoding.yaml").read_text()) == full_encoding
    assert (top / "split_0" / "fold_0" / "encoding.yaml").read_text() == (
        top / "encoding.yaml"
    ).read_text()
    cub5_top = tmp / "folds" / CUB5_FOLD_NAME
    assert yaml.safe_load((cub5_top / "encoding.yaml").read_text()) == {
        name: index for index, name in enumerate(CUB5)
    }
    # The CUB5 class draw and its encoding file are the published ones, byte for byte.
    assert f"match    {CUB5_FOLD_NAME}/encoding.yaml" in results["cub5"].stdout
    assert yaml.safe_load((cub5_top / "encoding-origine.yaml").read_text()) == full_encoding
    for top_dir, classes in ((top, CUB_CLASSES), (cub5_top, CUB5)):
        train, valid, test = (read_rows(top_dir / "split_0" / "fold_0", name) for name in CSV_NAMES)
        for image, mask, class_name in train + valid + test:
            assert files[image]["segmentation"] == mask and files[image]["class"] == class_name
            assert image.startswith(f"CUB_200_2011/images/{class_name}/")
        assert all(files[row[0]]["train"] for row in train + valid)
        expected_test = [
            path for path, info in files.items() if not info["train"] and info["class"] in classes
        ]
        assert [row[0] for row in test] == expected_test
        assert sorted({row[2] for row in valid}) == sorted(classes)  # one per class
    assert sorted(row[2] for row in read_rows(cub5_top / "split_0" / "fold_0", CSV_NAMES[0])) == (
        sorted(CUB5 * 4)
    )


def check_cub_evaluation(dataset, rows, files, encoding, short_side):
    for index, (image_path, _, class_name) in enumerate(rows):
        info = files[image_path]
        sample = dataset[index]
        assert sample["label"] == encoding[class_name]
        original = decoded(dataset.image_paths[index])
        upscaled = short_side_size(*original.shape[:2], short_side)
        expected, padding = eval_expected(original, upscaled)
        assert dataset.geometry[index] == Geometry(
            original.shape[:2], upscaled, expected.shape[:2], padding
        )
        assert torch.equal(sample["image"], normalized(expected))
        # Majority of annotators: grey > 127.5 (128, 200 and 255, not 100 or 127).
        foreground = (info["mask"] > 127).astype(np.float32)
        assert torch.equal(sample["mask"], torch.from_numpy(foreground)[None])
        assert 0 < foreground.mean() < 1


def test_cuball_reads_the_200_class_fold(cub):
    tmp, files, _ = cub
    config = paper_config("cuball-no-erasing.yaml", tmp / "data", tmp / "folds")
    assert (config["crop_size"], config["up_scale_small_dim_to"]) == ([480, 480], 500)
    assert config["nbr_classes"] == config["model"]["num_classes"] == 200
    fold_dir = loader.fold_dir(loader.DataConfig.from_config(config))
    assert fold_dir == tmp / "folds" / CUB_FOLDER / "split_0" / "fold_0"
    encoding = {name: int(name[:3]) - 1 for name in CUB_CLASSES}
    valid = loader.build_dataset(loader.DataConfig.from_config(config), "valid", train=False)
    assert sorted(valid.labels) == list(range(200))
    valid_rows = read_rows(fold_dir, CSV_NAMES[1])
    assert valid.labels == [encoding[row[2]] for row in valid_rows]
    test_rows = read_rows(fold_dir, CSV_NAMES[2])
    test = loader.build_dataset(loader.DataConfig.from_config(config), "test", train=False)
    check_cub_evaluation(test, test_rows, files, encoding, 500)
    geometry = {row[0].rsplit("/", 1)[1]: test.geometry[i] for i, row in enumerate(test_rows)}
    # 103 x 140: r = 500 / 103, 103 r = 499.99... -> 499 (truncated), 140 r -> 679.
    assert geometry["Gray_Catbird_0002_1901.jpg"] == Geometry(
        (103, 140), (499, 679), (512, 704), (6, 7, 12, 13)
    )
    assert geometry["Ovenbird_0006_9905.jpg"] == Geometry(
        (500, 520), (500, 520), (512, 544), (6, 6, 12, 12)
    )
    assert geometry["Species_040_0002_4001.jpg"] == Geometry(
        (45, 60), (500, 666), (512, 672), (6, 6, 3, 3)
    )


def test_cub_training_crops_are_480_windows_of_the_upscaled_image(cub):
    tmp, files, _ = cub
    config = paper_config("cuball-no-erasing.yaml", tmp / "data", tmp / "folds")
    rows = read_rows(loader.fold_dir(loader.DataConfig.from_config(config)), CSV_NAMES[0])
    dataset = loader.build_dataset(loader.DataConfig.from_config(config), "train", train=True)
    assert len(dataset) == 20
    flipped = set()
    for index, (image_path, _, _class_name) in enumerate(rows):
        sample = dataset[index]
        assert sample["label"] == files[image_path]["class_id"] - 1
        assert sample["image"].shape == (3, 480, 480)
        original = decoded(dataset.image_paths[index])
        height, width = short_side_size(*original.shape[:2], 500)
        canvas = np.asarray(
            Image.fromarray(original).resize((width, height), Image.Resampling.BILINEAR)
        )
        crop = to_uint8(sample["image"])
        # Horizontal flip only: no vertical flip, no colour jitter for CUB.
        found = [crop_positions(canvas, crop), crop_positions(canvas[:, ::-1], crop)]
        assert sum(map(bool, found)) == 1, image_path
        flipped.add(bool(found[1]))
    assert flipped == {True, False}


def test_cub5_config_uses_its_own_fold_folder(cub):
    tmp, files, _ = cub
    config = paper_config("cub5-4-erasing.yaml", tmp / "data", tmp / "folds")
    assert config["fold_name"] == CUB5_FOLD_NAME and config["nbr_classes"] == 5
    fold_dir = loader.fold_dir(loader.DataConfig.from_config(config))
    assert fold_dir == tmp / "folds" / CUB5_FOLD_NAME / "split_0" / "fold_0"
    encoding = {name: index for index, name in enumerate(CUB5)}
    train = loader.build_dataset(loader.DataConfig.from_config(config), "train", train=True)
    assert sorted(train.labels) == sorted(list(range(5)) * 4)
    valid = loader.build_dataset(loader.DataConfig.from_config(config), "valid", train=False)
    assert sorted(valid.labels) == list(range(5))
    rows = read_rows(fold_dir, CSV_NAMES[2])
    test = loader.build_dataset(loader.DataConfig.from_config(config), "test", train=False)
    assert len(test) == 10
    check_cub_evaluation(test, rows, files, encoding, 500)


# ----------------------------------------------------------------------------- Oxford Flowers 102

OXF_COUNT = 110
OXF_TRAIN = (7, 3, 58, 91, 102, 44)
OXF_VALID = (12, 1, 77, 105)
OXF_TEST = tuple(k for k in range(1, OXF_COUNT + 1) if k not in OXF_TRAIN + OXF_VALID)
OXF_SIZES = {1: (49, 60), 12: (70, 66), 77: (40, 40)}
OXF_SHORT_SIDE = 64


def oxf_label(image_id: int) -> int:
    """1-based label of ``imagelabels.mat``; ids 1..102 cover every class once."""
    return (image_id * 37) % 102 + 1


def oxf_flower(height: int, width: int) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    return ((rows - height / 2) / (height / 3)) ** 2 + ((cols - width / 2) / (width / 3)) ** 2


def build_oxf(data_root: Path) -> Path:
    """jpg/image_XXXXX.jpg, segmim/segmim_XXXXX.jpg (flower on pure blue), imagelabels.mat and
    setid.mat as MATLAB files."""
    root = data_root / OXF_FOLDER
    (root / "jpg").mkdir(parents=True)
    (root / "segmim").mkdir()
    for image_id in range(1, OXF_COUNT + 1):
        height, width = OXF_SIZES.get(image_id, (42 + image_id % 5, 55 + image_id % 7))
        image = texture(height, width, 1000 + image_id)
        image[..., 1] //= 3  # a green-ish background is no problem; the flower is red
        flower = oxf_flower(height, width) <= 1
        image[flower] = (image[flower] // 4) + np.array([180, 0, 0], np.uint8)
        trimap = image.copy()
        trimap[~flower] = (0, 0, 254)
        Image.fromarray(image).save(root / "jpg" / f"image_{image_id:05d}.jpg", quality=90)
        Image.fromarray(trimap).save(root / "segmim" / f"segmim_{image_id:05d}.jpg", quality=90)
    labels = np.array([[oxf_label(k) for k in range(1, OXF_COUNT + 1)]], dtype=np.float64)
    sio.savemat(root / "imagelabels.mat", {"labels": labels})
    sio.savemat(
        root / "setid.mat",
        {
            key: np.array([ids], dtype=np.uint16)
            for key, ids in (("trnid", OXF_TRAIN), ("valid", OXF_VALID), ("tstid", OXF_TEST))
        },
    )
    return root


@pytest.fixture(scope="module")
def oxf(tmp_path_factory):
    return replica_with_folds(tmp_path_factory, "oxf", build_oxf)


def test_oxf_folds_and_binary_masks(oxf):
    tmp, root, result = oxf
    assert f"{OXF_COUNT} masks" in result.stdout
    assert f"train {len(OXF_TRAIN)}, valid {len(OXF_VALID)}, test {len(OXF_TEST)}" in result.stdout
    fold_dir = tmp / "folds" / OXF_FOLDER / "split_0" / "fold_0"
    for name, ids in zip(CSV_NAMES, (OXF_TRAIN, OXF_VALID, OXF_TEST)):
        assert read_rows(fold_dir, name) == [
            (f"jpg/image_{k:05d}.jpg", f"segmim_bin/segmim_{k:05d}.png", str(oxf_label(k) - 1))
            for k in ids
        ]
    encoding = yaml.safe_load((fold_dir / "encoding.yaml").read_text())
    assert encoding == {str(label): label for label in range(102)}
    for image_id in range(1, OXF_COUNT + 1):
        with Image.open(root / "segmim_bin" / f"segmim_{image_id:05d}.png") as png:
            assert png.format == "PNG"
            mask = np.asarray(png)
        shape = decoded(root / "jpg" / f"image_{image_id:05d}.jpg").shape[:2]
        assert mask.shape == shape and set(np.unique(mask).tolist()) == {0, 255}
        distance = oxf_flower(*shape)
        assert (mask[distance <= 0.6] == 255).all() and (mask[distance >= 1.6] == 0).all()


def oxf_config(tmp: Path) -> dict:
    return paper_config(
        "oxford-flowers-no-erasing.yaml",
        tmp / "data",
        tmp / "folds",
        f"up_scale_small_dim_to={OXF_SHORT_SIDE}",
        "crop_size=[56, 56]",
        "model.kmax=1.0",
    )


def test_oxf_evaluation_samples(oxf):
    tmp, root, _ = oxf
    config = oxf_config(tmp)
    assert config["nbr_classes"] == config["model"]["num_classes"] == 102
    for split, ids in (("valid", OXF_VALID), ("test", OXF_TEST)):
        dataset = loader.build_dataset(loader.DataConfig.from_config(config), split, train=False)
        assert dataset.labels == [oxf_label(k) - 1 for k in ids]
        for index in range(len(ids)) if split == "valid" else range(0, len(ids), 9):
            sample = dataset[index]
            original = decoded(root / "jpg" / f"image_{ids[index]:05d}.jpg")
            upscaled = short_side_size(*original.shape[:2], OXF_SHORT_SIDE)
            expected, padding = eval_expected(original, upscaled)
            assert dataset.geometry[index] == Geometry(
                original.shape[:2], upscaled, expected.shape[:2], padding
            )
            assert torch.equal(sample["image"], normalized(expected))
            png = np.asarray(Image.open(root / "segmim_bin" / f"segmim_{ids[index]:05d}.png"))
            foreground = torch.from_numpy((png != 0).astype(np.float32))
            assert torch.equal(sample["mask"], foreground[None])
    valid = loader.build_dataset(loader.DataConfig.from_config(config), "valid", train=False)
    # 49 x 60: r = 64 / 49, 49 r = 63.99... -> 63 (truncated); 70 x 66 is not up-scaled.
    assert valid.geometry[1] == Geometry((49, 60), (63, 78), (64, 96), (0, 1, 9, 9))
    assert valid.geometry[0] == Geometry((70, 66), (70, 66), (96, 96), (13, 13, 15, 15))
    assert valid.geometry[2] == Geometry((40, 40), (64, 64), (64, 64), (0, 0, 0, 0))


def test_oxf_training_crops(oxf):
    tmp, root, _ = oxf
    dataset = loader.build_dataset(
        loader.DataConfig.from_config(oxf_config(tmp)), "train", train=True
    )
    assert dataset.labels == [oxf_label(k) - 1 for k in OXF_TRAIN]
    flipped = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index, image_id in enumerate(OXF_TRAIN):
            crop = to_uint8(dataset[index]["image"])
            assert crop.shape == (56, 56, 3)
            original = decoded(root / "jpg" / f"image_{image_id:05d}.jpg")
            height, width = short_side_size(*original.shape[:2], OXF_SHORT_SIDE)
            canvas = np.asarray(
                Image.fromarray(original).resize((width, height), Image.Resampling.BILINEAR)
            )
            found = [crop_positions(canvas, crop), crop_positions(canvas[:, ::-1], crop)]
            assert sum(map(bool, found)) == 1, (image_id, epoch)
            flipped.add(bool(found[1]))
    assert flipped == {True, False}
