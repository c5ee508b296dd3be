"""The settings of a run that the training and evaluation loops read, built once from the
validated configuration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from deepmil.methods import Erasing, Method, get_method
from deepmil.metrics import MetricSettings
from deepmil.precision import FLOAT32, Precision


@dataclass(frozen=True)
class RunSettings:
    """What :func:`deepmil.engine.train_one_epoch` and :func:`deepmil.engine.evaluate` need:
    the method, the device, the run's seed, the precision, recursive erasing, the localisation
    metrics and the crop rule of the evaluation geometry (``exact_eval_crop``).

    The default is the min-max entropy model in float32 on the CPU, seed 0, no erasing.
    """

    method: Method = field(default_factory=lambda: get_method("minmax"))
    device: torch.device = torch.device("cpu")
    seed: int = 0
    precision: Precision = FLOAT32
    erasing: Erasing = Erasing()
    metrics: MetricSettings = MetricSettings()
    exact_crop: bool = False

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], device: torch.device, precision: Precision | None = None
    ) -> RunSettings:
        """The settings of a validated configuration on ``device``; ``precision`` (built once
        per run, since it holds the fp16 scaler) defaults to the configuration's."""
        if precision is None:
            precision = Precision.build(config["amp"], device, config["channels_last"])
        return cls(
            method=get_method(config["method"]),
            device=device,
            seed=config["MYSEED"],
            precision=precision,
            erasing=Erasing(
                config["nbr_times_erase"], config["sigma_erase"], config["epoch_start_erasing"]
            ),
            metrics=MetricSettings.from_config(config["metrics"]),
            exact_crop=config["exact_eval_crop"],
        )

    def erasing_at(self, epoch: int) -> Erasing | None:
        """The erasing settings in ``epoch``, or None when erasing does not run then."""
        return self.erasing if self.erasing.active(epoch) else None
