"""What a configuration can name: the methods, the backbones and the datasets, one row each.

Torch-free, so that a configuration is validated without importing torch. A method's behaviour
lives in ``deepmil.methods`` (keyed by the same names), a dataset's image pipeline in
``loader.py`` and its fold builder in ``create_folds.py`` (keyed by ``DatasetSpec.folds``).
"""

from __future__ import annotations

from dataclasses import dataclass

from deepmil.errors import ConfigError


@dataclass(frozen=True)
class MethodInfo:
    """A method of the comparison: its ``method:`` value, table label, and whether it accepts
    recursive erasing (``nbr_times_erase > 0``)."""

    name: str
    label: str
    erases: bool = False


# In the paper's table order.
METHODS = {
    info.name: info
    for info in (
        MethodInfo("allones", "All-ones"),
        MethodInfo("cam", "CAM"),
        MethodInfo("gradcam", "Grad-CAM"),
        MethodInfo("wildcat", "WILDCAT"),
        MethodInfo("minmax", "Min-max entropy", erases=True),
    )
}
METHOD_NAMES = tuple(METHODS)

DEEP_STEM_MODELS = ("resnet18", "resnet50", "resnet101")
TORCHVISION_MODELS = ("tv_resnet18", "tv_resnet50", "tv_resnet101")
MODEL_NAMES = DEEP_STEM_MODELS + TORCHVISION_MODELS
MASK_NORMALIZATIONS = ("batch", "sample")
TRUNK_DOWNSAMPLINGS = 5


def feature_map_size(size: int, num_downsamplings: int = TRUNK_DOWNSAMPLINGS) -> int:
    """Spatial size of a trunk's output after ``num_downsamplings`` 3x3 / stride-2 / pad-1
    reductions of an input of ``size`` pixels."""
    for _ in range(num_downsamplings):
        size = (size - 1) // 2 + 1
    return size


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its ``dataset:`` value, folder under ``data_root`` (empty: ``data_root`` is
    the dataset's own folder), allowed class counts (``None``: any; the synthetic set has
    ``synthetic.num_classes``), training augmentation (``jitter``: colour jitter and vertical
    flips besides the horizontal one), whether stain augmentation applies, its CRF parameter set
    (``crf_params.PARAMETER_SETS``), the ``create_folds.py --dataset`` values that write its fold
    folders (value -> fold folder name), its mask rule (foreground is ``> mask_threshold / 255``
    of the mask's full scale, or ``!= 0`` when it is ``None``), the script of the repository root
    that downloads it (``None``: generated or the user's own, not downloaded) and whether a fold
    CSV row may leave its mask empty (``optional_masks``: the localisation metrics are then
    computed on the images that have one)."""

    name: str
    folder: str
    class_counts: tuple[int, ...] | None
    jitter: bool
    histology: bool
    crf: str
    folds: dict[str, str]
    mask_threshold: float | None = None
    download: str | None = None
    optional_masks: bool = False


DATASETS = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "glas",
            "GlaS-2015/Warwick QU Dataset (Released 2016_07_08)",
            (2,),
            jitter=True,
            histology=True,
            crf="glas",
            folds={"glas": "glas"},
            download="download-glas-dataset.sh",
        ),
        DatasetSpec(
            "Caltech-UCSD-Birds-200-2011",
            "Caltech-UCSD-Birds-200-2011",
            (200, 5),
            jitter=False,
            histology=False,
            crf="cub",
            folds={
                "cub": "Caltech-UCSD-Birds-200-2011",
                "cub5": "Caltech-UCSD-Birds-200-2011-CUB5",
            },
            mask_threshold=127.5,
            download="download-caltech-ucsd-birds-200-2011-dataset.sh",
        ),
        DatasetSpec(
            "Oxford-flowers-102",
            "Oxford-flowers-102",
            (102,),
            jitter=False,
            histology=False,
            crf="cub",
            folds={"oxf": "Oxford-flowers-102"},
            download="download-Oxford-flowers-102-dataset.sh",
        ),
        DatasetSpec(
            "synthetic",
            "synthetic",
            None,
            jitter=True,
            histology=False,
            crf="cub",
            folds={"synthetic": "synthetic"},
        ),
        DatasetSpec(
            "folder",
            "",
            None,
            jitter=False,
            histology=False,
            crf="cub",
            folds={"folder": "folder"},
            optional_masks=True,
        ),
    )
}
DATASET_NAMES = tuple(DATASETS)
# ``create_folds.py --dataset`` value -> the dataset it belongs to.
FOLD_BUILDERS = {builder: spec for spec in DATASETS.values() for builder in spec.folds}


def data_folder(dataset: str, fold_name: str | None) -> str:
    """The folder under ``data_root`` of ``dataset``'s files (empty for ``folder``: its
    ``data_root`` is the user's dataset folder itself). The synthetic set lives in the folder
    named like its folds (``fold_name``, ``synthetic`` by default), so that sets of different
    ``synthetic:`` parameters live side by side."""
    if dataset == "synthetic" and fold_name:
        return fold_name
    return dataset_spec(dataset).folder


def dataset_spec(name: str) -> DatasetSpec:
    """The row of dataset ``name``; a ``ValueError`` listing the known ones otherwise."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    return DATASETS[name]
