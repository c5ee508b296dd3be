"""The methods behind one interface: build the network, train one step, give the evaluation
outputs.

Each method of ``deepmil.registry.METHODS`` has one object here. :func:`get_method` is how the
driver, the engine and the benchmark find it, so the loops never branch on a method's name.
Adding a baseline means one class (here or in its own module) and one line in :data:`METHODS`,
plus its row in the registry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

import reproducibility
from deepmil import engine
from deepmil.backbone import load_pretrained_trunk, torchvision_weights
from deepmil.baselines import CAMNet, WildcatNet, class_map_mask, grad_cam
from deepmil.checkpoint import load_model_weights
from deepmil.distributed import average_gradients, no_sync
from deepmil.losses import classifier_loss, localizer_loss, negative_loss, positive_loss
from deepmil.model import ModelOutput, build_model
from deepmil.precision import Precision
from deepmil.pretrain import PretrainSpec, ensure_trunk, load_synthetic_trunk
from deepmil.registry import DEEP_STEM_MODELS

LOGGER = logging.getLogger("train_deepmil")


class Outputs(NamedTuple):
    """A method's evaluation outputs for a batch: its class scores, its localisation map in
    [0, 1] at the input size, the per-image losses and the class scores of its other heads, by
    name (min-max: the localizer's)."""

    scores: torch.Tensor
    mask: torch.Tensor
    losses: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Erasing:
    """Recursive-erasing settings: ``passes`` (``nbr_times_erase``), the trust decay ``sigma``
    and the first epoch it runs in."""

    passes: int = 0
    sigma: float = 10.0
    start_epoch: int = 1

    def active(self, epoch: int) -> bool:
        """Erasing runs in training only, from ``start_epoch`` on, if ``passes > 0``."""
        return self.passes > 0 and epoch >= self.start_epoch


class Method:
    """One method of the comparison.

    ``loss_terms`` are the step's loss terms (summed into the logged ``loss``), ``logged`` the
    other values its step reports, ``eval_autocast`` whether its evaluation forward pass may run
    under autocast.
    """

    name: str
    loss_terms: tuple[str, ...] = ("loss_cl",)
    logged: tuple[str, ...] = ()
    eval_autocast: bool = True

    def build(self, model_config: dict) -> nn.Module:
        """The network it trains, from the validated ``model`` section (weights not loaded)."""
        raise NotImplementedError

    def train_step(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        seed: int,
        precision: Precision,
        erasing: Erasing | None,
    ) -> dict[str, torch.Tensor]:
        """Forward and backward of one mini-batch (no optimizer step); ``erasing`` is set in the
        epochs where recursive erasing runs. Returns the logged values and ``scores``."""
        return engine.classifier_step(model, images, labels, seed, precision)

    def predict(
        self, network: nn.Module, images: torch.Tensor, batched: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class scores and localisation map in [0, 1] at the input size (float32) of
        ``images``, as :meth:`outputs` gives them; ``batched`` when a batch holds several
        images."""
        raise NotImplementedError

    def outputs(
        self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor, batched: bool
    ) -> Outputs:
        """The evaluation outputs of ``images``; ``batched`` when a batch holds several
        images."""
        raise NotImplementedError


class MinMaxEntropy(Method):
    """The min-max entropy model: its map is the mask ``R+`` and its class the positive
    region's."""

    name = "minmax"
    loss_terms = ("loss_seg", "loss_pos", "loss_neg")
    logged = ("loss_seg_pass_mean",)

    def build(self, model_config: dict) -> nn.Module:
        return build_model(model_config)

    def train_step(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        seed: int,
        precision: Precision,
        erasing: Erasing | None,
    ) -> dict[str, torch.Tensor]:
        """The plain step, or recursive erasing (gradients averaged once, after every pass)."""
        if erasing is None:
            return engine.plain_step(model, images, labels, seed, precision)
        with no_sync(model):
            stats = engine.erasing_step(
                model, images, labels, seed, erasing.passes, erasing.sigma, precision
            )
        average_gradients(model)
        return stats

    def forward(self, network: nn.Module, images: torch.Tensor, batched: bool) -> ModelOutput:
        """Every output of the network for ``images``, in float32.

        The mask is min-max normalised per image, as in a batch of one, whatever the batch
        size; ``batched`` also sends the positive and negative regions through the network
        together.
        """
        out = network(images, mask_normalization="sample", fused_regions=batched)
        return ModelOutput(*(tensor.float() for tensor in out))

    def predict(
        self, network: nn.Module, images: torch.Tensor, batched: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of ``R+`` and the mask ``R+``."""
        out = self.forward(network, images, batched)
        return out.pos_scores, out.mask

    def outputs(
        self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor, batched: bool
    ) -> Outputs:
        """Scores of ``R+``, the mask ``R+``, the per-image ``L_seg``, ``L_pos``, ``L_neg``
        and the localizer head's scores (``localizer``)."""
        out = self.forward(network, images, batched)
        losses = {
            "loss_seg": localizer_loss(out.seg_scores, labels, reduction="none"),
            "loss_pos": positive_loss(out.pos_scores, labels, reduction="none"),
            "loss_neg": negative_loss(out.neg_scores, reduction="none"),
        }
        return Outputs(out.pos_scores, out.mask, losses, {"localizer": out.seg_scores})


class ClassifierBaseline(Method):
    """A classifier trained with cross-entropy ``L_cl`` and localised by its own map."""

    def build(self, model_config: dict) -> nn.Module:
        return CAMNet(
            model_config["name"],
            model_config["num_classes"],
            torchvision_weights=torchvision_weights(model_config),
        )

    def localize(
        self, network: nn.Module, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class scores and the predicted class's map, upsampled and normalised per image."""
        output = network(images)
        classes = output.scores.argmax(dim=1)
        return output.scores, class_map_mask(output.maps.float(), classes, tuple(images.shape[-2:]))

    def predict(
        self, network: nn.Module, images: torch.Tensor, batched: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores, mask = self.localize(network, images)
        return scores.float(), mask

    def outputs(
        self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor, batched: bool
    ) -> Outputs:
        scores, mask = self.predict(network, images, batched)
        losses = {"loss_cl": classifier_loss(scores, labels, reduction="none")}
        return Outputs(scores, mask, losses, {})


class CAM(ClassifierBaseline):
    """Global average pooling + linear classifier; the class activation map."""

    name = "cam"


class WILDCAT(ClassifierBaseline):
    """The localizer head alone (WILDCAT pooling); the predicted class's map."""

    name = "wildcat"

    def build(self, model_config: dict) -> nn.Module:
        return WildcatNet(
            model_config["name"],
            model_config["num_classes"],
            model_config["modalities"],
            model_config["kmax"],
            model_config["kmin"],
            model_config["alpha"],
            model_config["dropout"],
            model_config["apply_min_term"],
            torchvision_weights=torchvision_weights(model_config),
        )


class GradCAM(ClassifierBaseline):
    """The CAM classifier localised post hoc by Grad-CAM on layer4 (float32, no autocast)."""

    name = "gradcam"
    eval_autocast = False

    def localize(
        self, network: nn.Module, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_cam(network, images)


class AllOnes(ClassifierBaseline):
    """The CAM classifier with a mask of ones (the lower bound of the tables)."""

    name = "allones"

    def localize(
        self, network: nn.Module, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ones = torch.ones(images.shape[0], 1, *images.shape[-2:], device=images.device)
        return network(images).scores, ones


METHODS: dict[str, Method] = {
    method.name: method for method in (AllOnes(), CAM(), GradCAM(), WILDCAT(), MinMaxEntropy())
}


def get_method(name: str) -> Method:
    """The method of ``method: name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def build_network(config: dict, device: torch.device) -> nn.Module:
    """The network of ``config``'s method on ``device``: seeded initialisation, then the
    pretrained trunk (``model.pretrained``: ``true`` the ImageNet weights, ``synthetic`` the
    trunk pretrained on the synthetic source task, built first if it is not cached) and the
    user's weights (``path_pre_trained``) when asked, channels-last and ``torch.compile`` as
    configured. The initialisation does not depend on whether the synthetic trunk was cached."""
    pretrained, cache = config["model"]["pretrained"], config["model"]["pretrained_cache"]
    trunk = PretrainSpec.from_config(config["pretrain"], config["model"]["name"])
    if pretrained == "synthetic":
        ensure_trunk(trunk, cache)
    reproducibility.set_seed(config["MYSEED"])
    model = get_method(config["method"]).build(config["model"])
    if pretrained == "synthetic":
        load_synthetic_trunk(model, trunk, cache)
    elif pretrained is True and config["model"]["name"] in DEEP_STEM_MODELS:
        load_pretrained_trunk(model, cache)
    if config["path_pre_trained"]:
        load_model_weights(model, Path(config["path_pre_trained"]), config["strict"])
        LOGGER.info("loaded weights from %s", config["path_pre_trained"])
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    if config["compile"]:
        model.compile(backend=config["compile"])
    return model
