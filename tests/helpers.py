"""Shared test helpers."""
from pathlib import Path

from create_folds import ensure_synthetic_folds
from deepmil.synthetic import SyntheticSpec


def tiny_synthetic_config(root: Path, n_train: int = 8, n_test: int = 5) -> dict:
    """Generate a 64-px synthetic dataset under ``root`` and return the config keys the loader
    reads to build its datasets."""
    ensure_synthetic_folds(root / "data", root / "folds",
                           SyntheticSpec(image_size=64, n_train=n_train, n_test=n_test))
    return {"dataset": "synthetic", "data_root": str(root / "data"),
            "fold_folder": str(root / "folds"), "fold_name": None, "split": 0, "fold": 0,
            "name_classes": "encoding.yaml", "model": {"num_classes": 2}, "crop_size": [64, 64],
            "padding_size": [0.5, 0.5], "padding_mode": "reflect", "up_scale_small_dim_to": None,
            "MYSEED": 0}
