"""Tests of the fold generator (create_folds.py)."""

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import io as sio

import create_folds
from deepmil.synthetic import SyntheticSpec

PUBLISHED = Path(__file__).resolve().parent / "data" / "published-folds.tar.gz"
GLAS_HEADER = "name,patient ID,grade (GlaS),grade (Sirinukunwattana et al. 2015)"
CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The published GlaS and CUB (200 classes) fold CSVs and CUB5's class list, unpacked from
    ``tests/data``; every CSV is checked against its published digest first."""
    root = tmp_path_factory.mktemp("published")
    with tarfile.open(PUBLISHED) as archive:
        archive.extractall(root, filter="data")
    csvs = sorted(root.rglob("*.csv"))
    assert len(csvs) == 6
    for path in csvs:
        assert _sha256(path) == create_folds.PUBLISHED_SHA256[path.relative_to(root).as_posix()]
    return root


def _reference_file(reference: Path, fold_name: str, file_name: str) -> Path:
    return reference / fold_name / "split_0" / "fold_0" / file_name


def _reference_rows(reference: Path, fold_name: str, set_name: str) -> list[tuple[str, str, str]]:
    text = _reference_file(reference, fold_name, f"{set_name}_s_0_f_0.csv").read_text()
    return [tuple(line.split(",")) for line in text.splitlines()]


def _glas_grades(reference: Path) -> list[tuple[str, str]]:
    """(name, grade) of every published GlaS row, in lexicographic name order."""
    rows = [
        row
        for name in ("train", "valid", "test")
        for row in _reference_rows(reference, "glas", name)
    ]
    return sorted((image[: -len(".bmp")], grade) for image, _, grade in rows)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_grade_csv(folder: Path, samples: list[tuple[str, str]]) -> None:
    """A ``Grade.csv`` like the real one: spaces after the commas, filler for the unused columns."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [GLAS_HEADER]
    for index, (name, grade) in enumerate(samples):
        detail = "adenomatous" if grade == "benign" else "moderately differentiated"
        lines.append(f"{name}, {index % 16 + 1}, {grade}, {detail}")
    (folder / "Grade.csv").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- GlaS


def test_glas_rebuilt_grade_csv_reproduces_the_published_files(reference, tmp_path, capsys):
    grades = _glas_grades(reference)
    _write_grade_csv(tmp_path / "data" / create_folds.DATASET_SUBFOLDERS["glas"], grades)
    out = tmp_path / "folds"
    argv = ["--dataset", "glas", "--data-root", str(tmp_path / "data"), "--out", str(out)]
    assert create_folds.main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 of 3 files match the published digests" in printed
    assert "expected to differ" not in printed
    for name in ("train_s_0_f_0.csv", "valid_s_0_f_0.csv", "test_s_0_f_0.csv"):
        ours = out / "glas" / "split_0" / "fold_0" / name
        assert ours.read_bytes() == _reference_file(reference, "glas", name).read_bytes()
    seed = (out / "glas" / "split_0" / "fold_0" / "seed.txt").read_text()
    assert seed.strip() == create_folds.SEED_FILE_TEXT


def test_glas_training_file_needs_the_draws_of_two_splits(reference, tmp_path, monkeypatch):
    _write_grade_csv(tmp_path, _glas_grades(reference))
    monkeypatch.setattr(create_folds, "N_SPLITS", 1)
    folds = create_folds.glas_folds(tmp_path)
    assert folds.valid == _reference_rows(reference, "glas", "valid")
    assert folds.train != _reference_rows(reference, "glas", "train")


def test_grade_csv_parsing_removes_every_space_and_names_bad_lines(tmp_path):
    (tmp_path / "Grade.csv").write_text(
        "name , patient ID , grade (GlaS) , grade (Sirinukunwattana et al. 2015)\n"
        " train_1 , 1 , be nign , healthy\n\n test A_2 , 2 , malignant , poorly differentiated\n"
    )
    expected = [("train_1", "benign"), ("testA_2", "malignant")]
    assert create_folds.read_grade_csv(tmp_path / "Grade.csv") == expected
    rows = "train_1, 1, benign, healthy\ntrain_2, 2, normal, x\n"
    (tmp_path / "Grade.csv").write_text(GLAS_HEADER + "\n" + rows)
    with pytest.raises(ValueError, match=r"Grade.csv:3: grade .* 'normal'"):
        create_folds.read_grade_csv(tmp_path / "Grade.csv")
    with pytest.raises(FileNotFoundError, match="Grade.csv"):
        create_folds.glas_folds(tmp_path / "missing")


def test_class_fold_takes_the_i_th_chunk_of_ceil_20_percent():
    items = [(str(i), "", "c") for i in range(37)]
    train, valid = create_folds.class_fold(items, 0)
    assert valid == items[:8] and train == items[8:]
    train, valid = create_folds.class_fold(items, 4)
    assert valid == items[32:] and train == items[:32]
    train, valid = create_folds.class_fold(items, 1)
    assert valid == items[8:16] and train == items[:8] + items[16:]
    sizes = [create_folds.valid_chunk_size(n) for n in (37, 48, 30, 29, 10, 2)]
    assert sizes == [8, 10, 6, 6, 2, 1]
    with pytest.raises(ValueError, match="fold"):
        create_folds.class_fold(items, create_folds.N_FOLDS)


# ----------------------------------------------------------------------------- CUB


def _write_cub(root: Path, images: list[tuple[str, str, bool]], classes: list[str]) -> None:
    """CUB metadata files for ``(class, file stem, is_train)`` entries, in images.txt order."""
    folder = root / "CUB_200_2011"
    folder.mkdir(parents=True, exist_ok=True)
    class_ids = {name: index + 1 for index, name in enumerate(classes)}
    (folder / "classes.txt").write_text("".join(f"{class_ids[name]} {name}\n" for name in classes))
    entries = list(enumerate(images, start=1))
    files = {
        "images.txt": [f"{i} {c}/{stem}.jpg" for i, (c, stem, _) in entries],
        "image_class_labels.txt": [f"{i} {class_ids[c]}" for i, (c, _, _) in entries],
        "train_test_split.txt": [f"{i} {int(flag)}" for i, (_, _, flag) in entries],
    }
    for name, lines in files.items():
        (folder / name).write_text("".join(line + "\n" for line in lines))


def _small_cub(root: Path) -> dict[str, list[str]]:
    counts = {CUB_CLASSES[0]: (7, 3), CUB_CLASSES[1]: (5, 2), CUB_CLASSES[2]: (10, 1)}
    images = []
    for name, (n_train, n_test) in counts.items():
        stem = name.split(".")[1]
        flags = [True] * n_train + [False] * n_test
        images += [(name, f"{stem}_{k:04d}_{100 + k}", flag) for k, flag in enumerate(flags)]
    images.insert(2, images.pop(8))  # a test image between training images, as in images.txt
    _write_cub(root, images, list(CUB_CLASSES))
    return {
        "train": [f"{c}/{s}" for c, s, flag in images if flag],
        "test": [f"{c}/{s}" for c, s, flag in images if not flag],
    }


def test_cub_replica_gives_stratified_folds_in_the_published_format(tmp_path):
    listed = _small_cub(tmp_path)
    folds = create_folds.cub_folds(tmp_path)
    expected_valid = [CUB_CLASSES[0]] * 2 + [CUB_CLASSES[1]] + [CUB_CLASSES[2]] * 2
    assert [row[2] for row in folds.valid] == expected_valid
    train_classes = [row[2] for row in folds.train]
    assert [train_classes.count(name) for name in CUB_CLASSES] == [5, 4, 8]
    every = folds.train + folds.valid
    listed_paths = {
        key: [f"CUB_200_2011/images/{path}.jpg" for path in paths] for key, paths in listed.items()
    }
    assert sorted(row[0] for row in every) == sorted(listed_paths["train"])
    assert [row[0] for row in folds.test] == listed_paths["test"]
    for image, mask, name in every + folds.test:
        relative = image[len("CUB_200_2011/images/") : -len(".jpg")]
        assert mask == f"segmentations/{relative}.png" and relative.startswith(name + "/")
    top = tmp_path / "folds" / create_folds.FOLD_NAMES["cub"]
    fold_dir = create_folds.write_folds(top, folds)
    expected_yaml = (
        "{001.Black_footed_Albatross: 0, 002.Laysan_Albatross: 1, 003.Sooty_Albatross: 2}\n"
    )
    assert (top / "encoding.yaml").read_text() == expected_yaml
    assert (fold_dir / "encoding.yaml").read_text() == expected_yaml
    assert (fold_dir / "seed.txt").read_text() == "MYSEED: 0"
    first_line = (fold_dir / "test_s_0_f_0.csv").read_bytes().split(b"\n")[0]
    assert first_line == b",".join(s.encode() for s in folds.test[0])
    assert create_folds.cub_folds(tmp_path) == folds


def test_cub_missing_metadata_file_is_named(tmp_path):
    _small_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        create_folds.cub_folds(tmp_path)
    _small_cub(tmp_path)
    with (tmp_path / "CUB_200_2011" / "images.txt").open("a") as handle:
        handle.write("oops\n")
    with pytest.raises(ValueError, match=r"images.txt:29"):
        create_folds.cub_folds(tmp_path)


def test_cub5_selection_is_18_170_107_98_177_with_seed_0():
    names = [f"{index:03d}.x" for index in range(1, 201)]
    assert create_folds.select_cub5_classes(names) == [names[i] for i in (18, 170, 107, 98, 177)]


def test_cub_reference_recovered_order_reproduces_cub5_and_encodings(reference, tmp_path):
    """The published 200-class fold determines the official training order per class.

    The shuffles are a fixed permutation of positions (``random.shuffle`` consumes the stream
    according to the list length only). Running the generator on a replica whose per-class training
    order is a placeholder maps every placeholder position to an output slot; the published file
    holds the true item in that slot, which recovers images.txt's training order. Every recovered
    item must belong to the class of its placeholder (the stratified grouping is right), and the
    CUB5 split, drawn from a different random stream, must then match its published digests.
    """
    fold_name = create_folds.FOLD_NAMES["cub"]
    train, valid, test = (
        _reference_rows(reference, fold_name, name) for name in ("train", "valid", "test")
    )
    classes = sorted({row[2] for row in test})
    assert len(classes) == 200

    def replica(root: Path, training: list) -> None:
        stems = [(row[2], row[0].rsplit("/", 1)[1][:-4]) for row in training]
        tests = [(row[2], row[0].rsplit("/", 1)[1][:-4]) for row in test]
        images = [(c, s, True) for c, s in stems] + [(c, s, False) for c, s in tests]
        images.sort(key=lambda entry: entry[0])
        _write_cub(root, images, classes)

    placeholder = sorted(train + valid)
    replica(tmp_path / "placeholder", placeholder)
    folds = create_folds.cub_folds(tmp_path / "placeholder")
    assert folds.test == test
    slot = dict(zip(folds.train + folds.valid, train + valid))
    assert all(slot[row][2] == row[2] for row in placeholder)
    replica(tmp_path / "recovered", [slot[row] for row in placeholder])
    out = tmp_path / "folds"
    cub5_name = create_folds.FOLD_NAMES["cub5"]
    create_folds.write_folds(out / cub5_name, create_folds.cub_folds(tmp_path / "recovered", True))
    create_folds.write_yaml(out / "cub-encoding.yaml", folds.encoding)
    statuses = create_folds.verify_folds(out, cub5_name)
    assert len(statuses) == 4 and set(statuses.values()) == {"match"}
    expected = create_folds.PUBLISHED_SHA256[f"{fold_name}/encoding.yaml"]
    assert _sha256(out / "cub-encoding.yaml") == expected
    origin = "encoding-origine.yaml"
    assert (out / cub5_name / origin).read_bytes() == (reference / cub5_name / origin).read_bytes()


# ----------------------------------------------------------------------------- Oxford Flowers 102


def test_oxf_mask_rules_on_hand_picked_colours():
    colours = np.array(
        [[[0, 0, 254], [0, 0, 255], [3, 2, 250], [12, 20, 230], [200, 40, 60], [40, 40, 200]]]
    )
    upstream = create_folds.upstream_foreground(colours).tolist()
    assert upstream == [[False, True, True, True, True, True]]
    tolerant = create_folds.tolerant_foreground(colours).tolist()
    assert tolerant == [[False, False, False, False, True, True]]


def test_oxf_replica_uses_the_official_split_and_writes_png_masks(tmp_path):
    root = tmp_path / create_folds.DATASET_SUBFOLDERS["oxf"]
    (root / "segmim").mkdir(parents=True)
    split = {"trnid": np.array([[3, 1]]), "valid": np.array([[2]]), "tstid": np.array([[5, 4]])}
    sio.savemat(root / "setid.mat", split)
    sio.savemat(root / "imagelabels.mat", {"labels": np.array([[77, 77, 1, 102, 2]])})
    for image_id in range(1, 6):
        trimap = np.zeros((24, 24, 3), dtype=np.uint8)
        trimap[...] = (0, 0, 254)
        trimap[6:18, 8:20] = (210, 60 + 20 * image_id, 40)
        Image.fromarray(trimap).save(root / "segmim" / f"segmim_{image_id:05d}.jpg", quality=75)
    out = tmp_path / "folds"
    argv = ["--dataset", "oxf", "--data-root", str(tmp_path), "--out", str(out), "--no-verify"]
    assert create_folds.main(argv) == 0
    fold_dir = out / "Oxford-flowers-102" / "split_0" / "fold_0"
    assert (fold_dir / "train_s_0_f_0.csv").read_text() == (
        "jpg/image_00003.jpg,segmim_bin/segmim_00003.png,0\n"
        "jpg/image_00001.jpg,segmim_bin/segmim_00001.png,76\n"
    )
    valid = (fold_dir / "valid_s_0_f_0.csv").read_text()
    assert valid == "jpg/image_00002.jpg,segmim_bin/segmim_00002.png,76\n"
    test = (fold_dir / "test_s_0_f_0.csv").read_text().splitlines()
    assert [line.split(",")[2] for line in test] == ["1", "101"]
    assert (fold_dir / "encoding.yaml").read_text() == "{'0': 0, '1': 1, '101': 101, '76': 76}\n"
    near = np.zeros((24, 24), dtype=bool)
    near[4:20, 6:22] = True
    for image_id in range(1, 6):
        rgb = np.asarray(Image.open(root / "segmim" / f"segmim_{image_id:05d}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(root / "segmim_bin" / f"segmim_{image_id:05d}.png"))
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert (mask[7:17, 9:19] == 255).all()
        assert (mask[~near] == 0).all()
        assert create_folds.upstream_foreground(rgb)[~near].mean() > 0.5


def test_oxf_published_encoding_and_suffix_mapping():
    encoding = {str(label): label for label in range(102)}
    text = create_folds.yaml.dump(encoding, default_flow_style=True).encode()
    expected = create_folds.PUBLISHED_SHA256["Oxford-flowers-102/encoding.yaml"]
    assert hashlib.sha256(text).hexdigest() == expected
    line = b"jpg/image_00001.jpg,segmim_bin/segmim_00001.png,76\n"
    mapped = create_folds.published_form("Oxford-flowers-102/split_0/fold_0/test_s_0_f_0.csv", line)
    assert mapped == b"jpg/image_00001.jpg,segmim_bin/segmim_00001.jpg,76\n"
    assert create_folds.published_form("glas/split_0/fold_0/test_s_0_f_0.csv", line) == line


def test_oxf_missing_metadata_is_named(tmp_path, capsys):
    argv = ["--dataset", "oxf", "--data-root", str(tmp_path), "--out", str(tmp_path / "folds")]
    assert create_folds.main(argv) == 1
    assert "imagelabels.mat" in capsys.readouterr().err


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_folds_are_deterministic_stratified_and_refreshed_on_spec_change(tmp_path):
    spec = SyntheticSpec(image_size=40, n_train=21, n_test=6)
    first = create_folds.ensure_synthetic_folds(tmp_path / "data", tmp_path / "folds_a", spec)
    second = create_folds.ensure_synthetic_folds(tmp_path / "data", tmp_path / "folds_b", spec)
    names = ("train_s_0_f_0.csv", "valid_s_0_f_0.csv", "test_s_0_f_0.csv", "encoding.yaml")
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in names)
    assert (first / "encoding.yaml").read_text() == "{class_0: 0, class_1: 1}\n"
    valid = (first / "valid_s_0_f_0.csv").read_text().splitlines()
    train = (first / "train_s_0_f_0.csv").read_text().splitlines()
    assert [line.rsplit(",", 1)[1] for line in valid] == ["class_0"] * 3 + ["class_1"] * 2
    assert len(train) == 21 - 5
    assert (first / "test_s_0_f_0.csv").read_text().splitlines()[0] == (
        "images/test_00000.png,masks/test_00000.png,class_0"
    )
    stamp = tmp_path / "folds_a" / "synthetic" / "spec.sha256"
    mtimes = {path: path.stat().st_mtime_ns for path in first.iterdir()}
    create_folds.ensure_synthetic_folds(tmp_path / "data", tmp_path / "folds_a", spec)
    assert {path: path.stat().st_mtime_ns for path in first.iterdir()} == mtimes
    old_stamp = stamp.read_text()
    changed = SyntheticSpec(image_size=40, n_train=15, n_test=6)
    create_folds.ensure_synthetic_folds(tmp_path / "data", tmp_path / "folds_a", changed)
    assert stamp.read_text() != old_stamp
    assert len((first / "train_s_0_f_0.csv").read_text().splitlines()) == 15 - 4


def test_synthetic_cli_uses_the_stored_spec(tmp_path, capsys):
    spec = SyntheticSpec(image_size=40, n_train=10, n_test=4)
    create_folds.ensure_synthetic_folds(tmp_path / "data", tmp_path / "folds", spec)
    data, out = str(tmp_path / "data"), str(tmp_path / "folds")
    argv = ["--dataset", "synthetic", "--data-root", data, "--out", out]
    assert create_folds.main(argv) == 0
    assert "train 8, valid 2, test 4" in capsys.readouterr().out
