"""Data pipeline: fold CSVs, class encodings, image datasets, transforms, collation and loaders."""

from __future__ import annotations

import csv
import logging
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import reproducibility
from deepmil.errors import DataError
from deepmil.geometry import Geometry, compute_geometry
from deepmil.registry import FOLD_BUILDERS, DatasetSpec, data_folder, dataset_spec

logger = logging.getLogger(__name__)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SHOWN_PATHS = 10

SPLITS = ("train", "valid", "test")
PADDING_MODES = ("constant", "edge", "reflect", "symmetric")
JITTER_RANGES = ((0.5, 1.5), (0.5, 1.5), (0.5, 1.5), (-0.05, 0.05))
JITTER_OPS: tuple[Callable[[Image.Image, float], Image.Image], ...] = (
    TF.adjust_brightness,
    TF.adjust_contrast,
    TF.adjust_saturation,
    TF.adjust_hue,
)
DATA_ROOT_HINT = "set it with --data-root or the DEEPMIL_DATA_ROOT environment variable"


class FoldRow(NamedTuple):
    """One fold CSV row: image and mask paths relative to the dataset root (the mask empty for
    an image without one, where the dataset allows it), class name."""

    image: str
    mask: str
    label: str


# ----------------------------------------------------------------------------- data settings


@dataclass(frozen=True)
class DataConfig:
    """The keys of a validated configuration that say which images a run reads and how."""

    dataset: str
    data_root: Path | None
    fold_folder: Path
    fold_name: str | None
    split: int
    fold: int
    name_classes: str | dict[str, int]
    num_classes: int
    crop_size: tuple[int, int]
    padding_size: tuple[float, float] | None
    padding_mode: str
    up_scale_small_dim_to: int | None
    stain_augmentation: bool
    seed: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DataConfig:
        """The data settings of a validated configuration."""
        root, padding = config["data_root"], config["padding_size"]
        return cls(
            dataset=config["dataset"],
            data_root=None if root is None else Path(root),
            fold_folder=Path(config["fold_folder"]),
            fold_name=config["fold_name"],
            split=config["split"],
            fold=config["fold"],
            name_classes=config["name_classes"],
            num_classes=config["model"]["num_classes"],
            crop_size=tuple(config["crop_size"]),
            padding_size=None if padding is None else tuple(padding),
            padding_mode=config["padding_mode"],
            up_scale_small_dim_to=config["up_scale_small_dim_to"],
            stain_augmentation=config["stain_augmentation"],
            seed=config["MYSEED"],
        )

    @property
    def folds_name(self) -> str:
        """Folder name of the fold CSVs (and of the synthetic images): ``fold_name or dataset``."""
        return self.fold_name or self.dataset

    def csv_path(self, split: str) -> Path:
        """The fold CSV of ``split``."""
        return fold_dir(self) / f"{split}_s_{self.split}_f_{self.fold}.csv"


# ----------------------------------------------------------------------------- paths


def dataset_root(data: DataConfig) -> Path:
    """Folder holding the files of ``data.dataset`` (fold CSV paths are relative to it)."""
    if data.data_root is None:
        raise DataError(f"config key 'data_root' is not set; {DATA_ROOT_HINT}")
    root = data.data_root / data_folder(data.dataset, data.fold_name)
    if not root.is_dir():
        script = dataset_spec(data.dataset).download
        fetch = f"; download it with: bash {script} {data.data_root}" if script else ""
        raise FileNotFoundError(f"dataset folder not found: {root}{fetch}; {DATA_ROOT_HINT}")
    return root


def fold_dir(data: DataConfig) -> Path:
    """``fold_folder / (fold_name or dataset) / split_<s> / fold_<f>``."""
    return data.fold_folder / data.folds_name / f"split_{data.split}" / f"fold_{data.fold}"


# ----------------------------------------------------------------------------- CSV and encoding


def read_fold_csv(path: str | Path, optional_mask: bool = False) -> list[FoldRow]:
    """Rows of a header-less fold CSV (``,`` delimiter, ``|`` quote character, 3 columns); with
    ``optional_mask`` the mask column may be empty."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fold CSV not found: {path}")
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=",", quotechar="|")
        for fields in reader:
            line = reader.line_num
            if line != len(rows) + 1:
                raise DataError(f"{path}, line {len(rows) + 1}: a row spans several lines")
            if len(fields) != 3:
                raise DataError(
                    f"{path}, line {line}: expected 3 columns (image, mask, class), got {len(fields)}"
                )
            required = (fields[0], fields[2]) if optional_mask else fields
            if not all(required):
                raise DataError(f"{path}, line {line}: empty field in {fields}")
            rows.append(FoldRow(*fields))
    if not rows:
        raise DataError(f"fold CSV is empty: {path}")
    warn_duplicates(rows, path)
    return rows


def warn_duplicates(rows: Sequence[FoldRow], path: Path) -> None:
    """Warn when an image is listed more than once in a fold CSV."""
    counts = Counter(row.image for row in rows)
    repeated = sorted(image for image, count in counts.items() if count > 1)
    if repeated:
        logger.warning(
            "%s lists %d image(s) more than once: %s",
            path,
            len(repeated),
            ", ".join(repeated[:SHOWN_PATHS]) + (" ..." if len(repeated) > SHOWN_PATHS else ""),
        )


def check_disjoint_splits(rows: Mapping[Path, Sequence[FoldRow]]) -> None:
    """Refuse an image that two fold CSVs (e.g. train and test) both list, naming both."""
    paths = list(rows)
    for index, first in enumerate(paths):
        images = {row.image for row in rows[first]}
        for second in paths[index + 1 :]:
            shared = sorted(images & {row.image for row in rows[second]})
            if shared:
                raise DataError(
                    f"{len(shared)} image(s) are listed in both {first} and "
                    f"{second}, e.g. {', '.join(shared[:3])}: the splits must not "
                    f"overlap"
                )


def _check_encoding(mapping: Any, source: str) -> dict[str, int]:
    """Validate a class-name -> id mapping whose ids must be exactly 0 .. n-1."""
    if not isinstance(mapping, Mapping) or not mapping:
        raise DataError(f"class encoding in {source} must be a non-empty mapping, got {mapping!r}")
    encoding = {str(name): value for name, value in mapping.items()}
    if len(encoding) != len(mapping):
        raise DataError(f"class encoding in {source} has duplicate class names")
    for name, value in encoding.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(
                f"class encoding in {source}: id of {name!r} is not an integer: {value!r}"
            )
    if sorted(encoding.values()) != list(range(len(encoding))):
        raise DataError(
            f"class encoding in {source}: ids must be 0 .. {len(encoding) - 1} without gaps"
        )
    return encoding


def load_encoding(
    name_classes: Mapping[str, int] | str, fold_directory: str | Path
) -> dict[str, int]:
    """Class encoding from an inline mapping (checked by the configuration schema) or a YAML file
    name inside ``fold_directory`` (checked here)."""
    if isinstance(name_classes, Mapping):
        return dict(name_classes)
    path = Path(fold_directory) / name_classes
    if not path.is_file():
        raise FileNotFoundError(
            f"class encoding file not found: {path} (config key 'name_classes')"
        )
    with path.open(encoding="utf-8") as handle:
        mapping = yaml.safe_load(handle)
    return _check_encoding(mapping, str(path))


def encode_labels(
    rows: Sequence[FoldRow], encoding: Mapping[str, int], csv_path: str | Path
) -> list[int]:
    """Integer label of each row; an unknown class names the CSV and its 1-based line."""
    labels = []
    for line, row in enumerate(rows, start=1):
        if row.label not in encoding:
            raise DataError(f"{csv_path}, line {line}: unknown class {row.label!r}")
        labels.append(encoding[row.label])
    return labels


# ----------------------------------------------------------------------------- images and masks


def too_large_error(path: Path, error: Exception) -> DataError:
    """The error for an image over Pillow's decompression-bomb limit."""
    return DataError(
        f"cannot read image {path}: it is larger than Pillow's limit of "
        f"{Image.MAX_IMAGE_PIXELS} pixels, which guards against decompression "
        f"bombs ({error}); shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS if the "
        f"file is trusted"
    )


def read_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image read from its header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        raise too_large_error(path, error) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    return height, width


def _open_decoded(path: Path) -> Image.Image:
    """Fully decode ``path`` in its own mode; a corrupt or oversized file names the path, and
    32-bit integer or float images (whose range is unknown) are refused."""
    try:
        with Image.open(path) as image:
            image.load()
            decoded = image.copy()
    except Image.DecompressionBombError as error:
        raise too_large_error(path, error) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot decode image {path}: {error}") from error
    if decoded.mode in ("I", "F"):
        raise DataError(
            f"cannot decode image {path}: {decoded.mode!r} images (32-bit integer "
            f"or float pixels) are not supported; save it with 8 or 16 bits per "
            f"channel"
        )
    return decoded


def _decode(path: Path, mode: str) -> Image.Image:
    """Fully decode ``path`` into a PIL image of ``mode``; 16-bit grey levels are brought to 8
    bits by ``round(v / 257)`` (Pillow's own conversion would clip them at 255)."""
    image = _open_decoded(path)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.rint(values / 257).astype(np.uint8), mode="L")
    return image.convert(mode)


def load_rgb(path: Path) -> Image.Image:
    """Decode an image as RGB."""
    return _decode(path, "RGB")


def binarize_mask(mask: np.ndarray, threshold: float | None, full_scale: int = 255) -> np.ndarray:
    """Foreground of a grey mask whose values run to ``full_scale``: ``> threshold / 255`` of it
    (CUB: 127.5), or ``!= 0`` when ``threshold`` is None (``DatasetSpec.mask_threshold``)."""
    if threshold is not None:
        return mask > threshold * full_scale / 255
    return mask != 0


def load_mask(path: Path, threshold: float | None) -> np.ndarray:
    """Decode a mask as grey levels (8 or 16 bits, kept exact) and binarise it (boolean h x w)
    with :func:`binarize_mask`."""
    image = _open_decoded(path)
    if image.mode in SIXTEEN_BIT_MODES:
        return binarize_mask(np.asarray(image), threshold, full_scale=65535)
    return binarize_mask(np.asarray(image.convert("L")), threshold)


def decoding_error(path: Path) -> str | None:
    """Why ``path`` cannot be fully decoded as an image, or None when it can."""
    try:
        _open_decoded(path)
    except ValueError as error:
        return str(error)
    return None


def verify_images(paths: Iterable[Path], workers: int = 2, quiet: bool = False) -> None:
    """Fully decode every file of ``paths`` (threads; a progress bar unless ``quiet``) and raise
    one error listing every file that fails."""
    paths = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        errors = [
            error
            for error in tqdm(
                pool.map(decoding_error, paths),
                total=len(paths),
                desc="checking images",
                leave=False,
                disable=True if quiet else None,
            )
            if error is not None
        ]
    if errors:
        shown = "\n  ".join(errors[:SHOWN_PATHS])
        more = f"\n  ... and {len(errors) - SHOWN_PATHS} more" if len(errors) > SHOWN_PATHS else ""
        raise DataError(
            f"{len(errors)} of {len(paths)} image files cannot be decoded:\n  {shown}{more}"
        )


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """Boolean h x w mask as a float {0, 1} tensor of shape 1 x h x w."""
    return torch.from_numpy(mask.astype(np.float32))[None]


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor 3 x H x W, scaled to [0, 1] then normalised (x - 0.5) / 0.5."""
    array = np.array(image, dtype=np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)
    return tensor.sub(0.5).div(0.5)


# ----------------------------------------------------------------------------- training padding


def train_padding(
    height: int, width: int, padding_size: Sequence[float] | None
) -> tuple[int, int, int, int]:
    """Training padding (top, bottom, left, right): ``int(ratio_h * h)`` and ``int(ratio_w * w)``."""
    if padding_size is None:
        return 0, 0, 0, 0
    pad_h, pad_w = int(padding_size[0] * height), int(padding_size[1] * width)
    return pad_h, pad_h, pad_w, pad_w


# ----------------------------------------------------------------------------- transforms


def resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bilinear PIL resize to (height, width); no-op when the size already matches."""
    height, width = size
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BILINEAR)


def pad_image(image: Image.Image, padding: Sequence[int], mode: str) -> Image.Image:
    """Pad an RGB PIL image by (top, bottom, left, right) with a NumPy padding mode."""
    if not any(padding):
        return image
    top, bottom, left, right = padding
    array = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode=mode)
    return Image.fromarray(array)


def eval_input(image: Image.Image, geometry: Geometry) -> torch.Tensor:
    """The network input of an evaluated image: up-scaled, reflect-padded, normalised."""
    image = resize_image(image, geometry.upscaled)
    return to_normalized_tensor(pad_image(image, geometry.padding, "reflect"))


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (1,), generator=generator).item())


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    """Uniform float in [low, high)."""
    return low + (high - low) * torch.rand((), dtype=torch.float64, generator=generator).item()


def random_crop(
    image: Image.Image, crop_size: tuple[int, int], generator: torch.Generator
) -> Image.Image:
    """Crop a (height, width) window at a uniformly drawn position (top drawn first)."""
    crop_h, crop_w = crop_size
    width, height = image.size
    top = _randint(height - crop_h + 1, generator)
    left = _randint(width - crop_w + 1, generator)
    return image.crop((left, top, left + crop_w, top + crop_h))


def color_jitter(image: Image.Image, generator: torch.Generator) -> Image.Image:
    """Brightness, contrast, saturation in U[0.5, 1.5] and hue in U[-0.05, 0.05], in random order.

    The adjustments run on the PIL image (8-bit arithmetic), so results do not depend on how many
    threads torch uses in a worker or in the main process.
    """
    order = torch.randperm(len(JITTER_OPS), generator=generator).tolist()
    factors = [_uniform(low, high, generator) for low, high in JITTER_RANGES]
    for op_index in order:
        image = JITTER_OPS[op_index](image, factors[op_index])
    return image


def stain_augment(image: Image.Image, generator: torch.Generator) -> Image.Image:
    """Histology stain perturbation (``deepmil.stain``, needs SPAMS) drawn from ``generator``."""
    from deepmil.stain import StainAugmentor  # SPAMS is needed only when this is switched on

    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return Image.fromarray(StainAugmentor()(np.asarray(image), np.random.default_rng(seed)))


def random_flip(
    image: Image.Image, method: Image.Transpose, generator: torch.Generator
) -> Image.Image:
    """Apply the PIL transpose ``method`` with probability 0.5."""
    if torch.rand((), generator=generator).item() < 0.5:
        return image.transpose(method)
    return image


# ----------------------------------------------------------------------------- dataset


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise DataError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    return int(value[0]), int(value[1])


class PhotoDataset(Dataset):
    """Images, labels and masks of one fold CSV.

    Training mode returns an augmented crop; evaluation mode returns the whole (up-scaled,
    padded) image and its binary mask at the original size (``None`` for an image without one,
    which a dataset with ``optional_masks`` allows). Augmentation randomness comes only
    from ``reproducibility.sample_generator(seed, epoch, index)``, so a sample depends on
    (seed, epoch, index) and never on worker or access order. With ``preload`` the images (and,
    in evaluation mode, the masks) are decoded into RAM at construction.
    """

    def __init__(
        self,
        rows: Sequence[FoldRow],
        root: str | Path,
        encoding: Mapping[str, int],
        spec: DatasetSpec,
        *,
        train: bool,
        crop_size: int | Sequence[int],
        padding_size: Sequence[float] | None = None,
        padding_mode: str = "reflect",
        up_scale_small_dim_to: int | None = None,
        preload: bool = False,
        seed: int = 0,
        csv_path: str | Path = "<rows>",
        stain_augmentation: bool = False,
    ) -> None:
        if padding_mode not in PADDING_MODES:
            raise DataError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        root = Path(root)
        self.rows = list(rows)
        self.spec = spec
        self.train = train
        self.crop_size = _pair(crop_size, "crop_size")
        self.padding_size = (
            None if padding_size is None else (float(padding_size[0]), float(padding_size[1]))
        )
        self.padding_mode = padding_mode
        self.up_scale_small_dim_to = up_scale_small_dim_to
        self.seed = operator.index(seed)
        self.stain_augmentation = stain_augmentation
        self.epoch = 0
        self.csv_path = Path(csv_path)
        self.labels = encode_labels(self.rows, encoding, self.csv_path)
        self.image_paths = [root / row.image for row in self.rows]
        self.mask_paths = [root / row.mask if row.mask else None for row in self.rows]
        self._check_files_exist()
        self.geometry = [self._read_geometry(i) for i in range(len(self.rows))]
        if train:
            self._check_crop_fits()
        self.images = [load_rgb(path) for path in self.image_paths] if preload else None
        self.masks = (
            [self._load_mask(path) for path in self.mask_paths] if preload and not train else None
        )

    def _check_files_exist(self) -> None:
        for line, paths in enumerate(zip(self.image_paths, self.mask_paths), start=1):
            for path in paths:
                if path is not None and not path.is_file():
                    raise FileNotFoundError(
                        f"file not found: {path} (listed in {self.csv_path}, line {line})"
                    )

    def _read_geometry(self, index: int) -> Geometry:
        image_path, mask_path = self.image_paths[index], self.mask_paths[index]
        image_size = read_size(image_path)
        mask_size = image_size if mask_path is None else read_size(mask_path)
        if image_size != mask_size:
            raise DataError(
                f"mask size {mask_size} of {mask_path} differs from image size {image_size} of {image_path} "
                f"(sizes are (height, width); listed in {self.csv_path}, line {index + 1})"
            )
        return compute_geometry(*image_size, self.up_scale_small_dim_to)

    def _train_size(self, index: int) -> tuple[int, int]:
        height, width = self.geometry[index].upscaled
        top, bottom, left, right = train_padding(height, width, self.padding_size)
        return height + top + bottom, width + left + right

    def _check_crop_fits(self) -> None:
        crop_h, crop_w = self.crop_size
        for index in range(len(self.rows)):
            height, width = self._train_size(index)
            if height < crop_h or width < crop_w:
                raise DataError(
                    f"image {self.image_paths[index]} is {height}x{width} (h x w) after up-scaling and "
                    f"padding, smaller than crop_size {self.crop_size}"
                )

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws ``__getitem__`` uses."""
        self.epoch = operator.index(epoch)

    def _image(self, index: int) -> Image.Image:
        if self.images is not None:
            return self.images[index]
        return load_rgb(self.image_paths[index])

    def original_image(self, index: int) -> np.ndarray:
        """Image ``index`` as stored (RGB, h x w x 3 uint8), for the CRF and the figures."""
        return np.asarray(self._image(index))

    def _load_mask(self, path: Path | None) -> np.ndarray | None:
        return None if path is None else load_mask(path, self.spec.mask_threshold)

    def _mask(self, index: int) -> np.ndarray | None:
        if self.masks is not None:
            return self.masks[index]
        return self._load_mask(self.mask_paths[index])

    def truth(self, index: int) -> torch.Tensor | None:
        """The ground truth of image ``index`` as the evaluation reads it (``1 x h x w``), or
        None for an image without a mask."""
        mask = self._mask(index)
        return None if mask is None else mask_tensor(mask)

    def _train_image(self, index: int) -> torch.Tensor:
        generator = reproducibility.sample_generator(self.seed, self.epoch, index)
        image = resize_image(self._image(index), self.geometry[index].upscaled)
        image = pad_image(
            image, train_padding(image.height, image.width, self.padding_size), self.padding_mode
        )
        image = random_crop(image, self.crop_size, generator)
        if self.spec.jitter:
            if self.stain_augmentation:
                image = stain_augment(image, generator)
            image = color_jitter(image, generator)
            image = random_flip(image, Image.Transpose.FLIP_LEFT_RIGHT, generator)
            image = random_flip(image, Image.Transpose.FLIP_TOP_BOTTOM, generator)
        else:
            image = random_flip(image, Image.Transpose.FLIP_LEFT_RIGHT, generator)
        return to_normalized_tensor(image)

    def _eval_image(self, index: int) -> torch.Tensor:
        return eval_input(self._image(index), self.geometry[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if self.train:
            return {"image": self._train_image(index), "label": self.labels[index], "index": index}
        return {
            "image": self._eval_image(index),
            "label": self.labels[index],
            "index": index,
            "mask": self.truth(index),
        }


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack images, labels and indices; masks (different sizes, or ``None``) stay a list."""
    collated = {
        "image": torch.stack([sample["image"] for sample in batch]),
        "label": torch.tensor([sample["label"] for sample in batch], dtype=torch.long),
        "index": torch.tensor([sample["index"] for sample in batch], dtype=torch.long),
    }
    if "mask" in batch[0]:
        collated["mask"] = [sample["mask"] for sample in batch]
    return collated


def fold_hint(data: DataConfig) -> str:
    """How to generate the folds of ``data`` (``create_folds.py`` writes split 0 / fold 0)."""
    name = data.folds_name
    dataset = next(
        (builder for builder, spec in FOLD_BUILDERS.items() if spec.folds[builder] == name), None
    )
    if dataset is None:
        return f"fold folder {name!r} is not one that create_folds.py writes"
    root = "--data-root" if FOLD_BUILDERS[dataset].folder else "--root"
    return (
        f"generate it with: python create_folds.py --dataset {dataset} "
        f"{root} {data.data_root} --out {data.fold_folder} (split 0, fold 0 only)"
    )


def log_localized(rows: Sequence[FoldRow], csv_path: Path) -> None:
    """Say on how many of the images of an evaluation set the localisation is measured."""
    localized = sum(bool(row.mask) for row in rows)
    if localized:
        logger.info(
            "%s: localisation on %d of %d images (those with a mask)",
            csv_path,
            localized,
            len(rows),
        )
    else:
        logger.warning(
            "%s: no image has a mask; its localisation metrics (F1+, F1-, IoU, PxAP) are NaN",
            csv_path,
        )


def build_dataset(
    data: DataConfig, split: str, train: bool, preload: bool | None = None
) -> PhotoDataset:
    """Dataset of ``fold_dir(data)/{split}_s_<s>_f_<f>.csv``.

    ``preload=None`` preloads the train and valid sets and loads the test set lazily. For an
    evaluation set of a dataset whose masks are optional, the log says how many images have
    one (the localisation metrics are computed on those).
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    root = dataset_root(data)
    csv_path = data.csv_path(split)
    if not csv_path.is_file():
        raise FileNotFoundError(f"fold CSV not found: {csv_path}; {fold_hint(data)}")
    spec = dataset_spec(data.dataset)
    rows = read_fold_csv(csv_path, optional_mask=spec.optional_masks)
    encoding = load_encoding(data.name_classes, fold_dir(data))
    if len(encoding) != data.num_classes:
        raise DataError(
            f"the class encoding (config key 'name_classes' = {data.name_classes!r}) has "
            f"{len(encoding)} classes but model.num_classes is {data.num_classes} (set "
            f"nbr_classes and model.num_classes to {len(encoding)})"
        )
    if spec.optional_masks and not train:
        log_localized(rows, csv_path)
    return PhotoDataset(
        rows,
        root,
        encoding,
        spec,
        train=train,
        crop_size=data.crop_size,
        padding_size=data.padding_size,
        padding_mode=data.padding_mode,
        up_scale_small_dim_to=data.up_scale_small_dim_to,
        preload=split != "test" if preload is None else preload,
        seed=data.seed,
        csv_path=csv_path,
        stain_augmentation=data.stain_augmentation,
    )


# ----------------------------------------------------------------------------- loaders


def make_loader(
    dataset: PhotoDataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """DataLoader over ``dataset``.

    Shuffled loaders use a ``DistributedSampler`` seeded with ``seed`` (also for one process);
    call ``set_loader_epoch`` before each epoch. Unshuffled loaders read every
    ``world_size``-th sample from ``rank`` on, so that the processes share a set without
    repeating any sample. No ``worker_init_fn`` is
    needed: each sample draws its augmentation from its own generator seeded by
    (seed, epoch, index), so batches do not depend on the number of workers. Workers are not
    persistent so that ``dataset.set_epoch`` reaches them, and the loader's private generator
    keeps it from consuming the global torch RNG.
    """
    if shuffle:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
    else:
        sampler = range(rank, len(dataset), world_size)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        persistent_workers=False,
        generator=generator,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch of the loader's sampler (shuffling) and dataset (augmentation)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
