"""Baselines trained and evaluated in the same framework: CAM, WILDCAT, Grad-CAM, all-ones.

- ``cam``: global average pooling + linear classifier; the map is the class activation map of
  the predicted class.
- ``wildcat``: the localizer head alone (WILDCAT pooling, cross-entropy on its scores); the map
  is the predicted class's map.
- ``gradcam``: the ``cam`` classifier, localised post hoc by Grad-CAM on layer4 (``grad-cam``
  package).
- ``allones``: the ``cam`` classifier with a mask of ones (the lower bound of the tables).

Every map is brought to the input size and min-max normalised per image, so 0.5 thresholds it
like the min-max entropy model's ``R+``. ``deepmil.methods`` trains and evaluates them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from deepmil.backbone import ResNetTrunk
from deepmil.model import WildcatHead, minmax_normalise


class ClassifierOutput(NamedTuple):
    """Class scores ``B x C`` and class maps ``B x C x h x w`` of a baseline network."""

    scores: torch.Tensor
    maps: torch.Tensor


class CAMNet(ResNetTrunk):
    """ResNet trunk, global average pooling and a linear classifier (``classifier``)."""

    head_prefixes = ("classifier.",)

    def __init__(self, name: str, num_classes: int, torchvision_weights: str | None = None) -> None:
        super().__init__(name, torchvision_weights)
        self.classifier = nn.Linear(self.trunk_channels, num_classes)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        """Scores of the pooled features; maps = ``sum_k w_ck f_k`` (the CAMs, bias left out)."""
        features = self.trunk(x)
        scores = self.classifier(features.mean(dim=(2, 3)))
        maps = torch.einsum("ck,bkhw->bchw", self.classifier.weight, features)
        return ClassifierOutput(scores, maps)


class WildcatNet(ResNetTrunk):
    """ResNet trunk and the WILDCAT localizer head (``headseg``) of the min-max entropy model."""

    head_prefixes = ("headseg.",)

    def __init__(
        self,
        name: str,
        num_classes: int,
        modalities: int,
        kmax: float,
        kmin: float,
        alpha: float,
        dropout: float,
        apply_min_term: bool = False,
        torchvision_weights: str | None = None,
    ) -> None:
        super().__init__(name, torchvision_weights)
        self.headseg = WildcatHead(
            self.trunk_channels, num_classes, modalities, kmax, kmin, alpha, dropout, apply_min_term
        )

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        """WILDCAT-pooled scores and the class maps they are pooled from."""
        return ClassifierOutput(*self.headseg(self.trunk(x)))


def class_map_mask(
    maps: torch.Tensor, classes: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The map of ``classes[b]`` for each image, upsampled to ``size``, normalised per image."""
    selected = maps[torch.arange(maps.shape[0], device=maps.device), classes].unsqueeze(1)
    upsampled = F.interpolate(selected, size=size, mode="bilinear", align_corners=True)
    return minmax_normalise(upsampled, per_sample=True)


class _ScoresOnly(nn.Module):
    """Exposes only the class scores of a :class:`CAMNet` (what ``grad-cam`` expects).

    It calls the network's eager ``forward``, so that the hooks ``grad-cam`` puts on layer4 run
    even when the network was compiled.
    """

    def __init__(self, network: CAMNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The class scores of ``x``."""
        return self.network.forward(x).scores


def grad_cam(
    network: CAMNet, images: torch.Tensor, classes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores and Grad-CAM on layer4 (``pytorch_grad_cam.GradCAM``) from one forward pass.

    The maps (``B x 1 x H x W``) are those of ``classes``, by default the predicted classes. The
    package normalises each map to [0, 1] and resizes it to the input. It runs in float32 with
    gradients enabled; its hooks are removed and the parameter gradients it leaves are dropped
    afterwards.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
    cam = GradCAM(model=_ScoresOnly(network), target_layers=[network.layer4[-1]])
    try:
        with torch.enable_grad():
            maps = cam(input_tensor=images.float(), targets=targets)
        scores = cam.outputs.detach()
    finally:
        cam.activations_and_grads.release()
        network.zero_grad(set_to_none=True)
    return scores, torch.from_numpy(maps).to(images.device).unsqueeze(1)
