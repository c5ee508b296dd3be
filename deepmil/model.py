"""The min-max entropy model: a shared ResNet trunk, a WILDCAT localizer head and a WILDCAT
classifier head applied to the positive and negative regions of the image."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from deepmil.backbone import ResNetTrunk, torchvision_weights
from deepmil.pooling import ClassWisePool, WildcatPool2d
from deepmil.registry import MASK_NORMALIZATIONS


class WildcatHead(nn.Module):
    """1x1 convolution to ``C*M`` modality maps, class-wise averaging, WILDCAT spatial pooling.

    Returns ``(scores B x C, class maps B x C x h x w)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        modalities: int,
        kmax: float,
        kmin: float,
        alpha: float,
        dropout: float,
        apply_min_term: bool = False,
    ) -> None:
        super().__init__()
        self.to_modalities = nn.Conv2d(
            in_channels, num_classes * modalities, kernel_size=1, bias=True
        )
        self.to_maps = ClassWisePool(modalities)
        self.wildcat = WildcatPool2d(kmax, kmin, alpha, dropout, apply_min_term)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.to_maps(self.to_modalities(features))
        return self.wildcat(maps), maps


class ModelOutput(NamedTuple):
    """Everything one default forward pass produces."""

    pos_scores: torch.Tensor
    pos_maps: torch.Tensor
    neg_scores: torch.Tensor
    neg_maps: torch.Tensor
    mask: torch.Tensor
    seg_scores: torch.Tensor
    seg_maps: torch.Tensor


def minmax_normalise(maps: torch.Tensor, per_sample: bool, eps: float = 1e-8) -> torch.Tensor:
    """``(maps - min) / max(max - min, eps)``, with min/max over the whole batch or per sample
    (a constant map becomes 0)."""
    if per_sample:
        flat = maps.flatten(1)
        shape = (-1,) + (1,) * (maps.dim() - 1)
        low, high = flat.min(dim=1).values.view(shape), flat.max(dim=1).values.view(shape)
    else:
        low, high = maps.min(), maps.max()
    return (maps - low) / (high - low).clamp_min(eps)


def check_mask_normalization(normalization: str) -> None:
    """Refuse a mask normalization other than ``batch`` or ``sample``."""
    if normalization not in MASK_NORMALIZATIONS:
        raise ValueError(
            f"unknown mask normalization {normalization!r}; expected one of {MASK_NORMALIZATIONS}"
        )


class MinMaxEntropyNet(ResNetTrunk):
    """Shared ResNet trunk with a localizer head (``headseg``) and a classifier head (``cl32``).

    ``forward(x)`` runs the localizer on ``x``, builds the pseudo-binary mask ``R+`` and
    classifies the positive (``x * R+``) and negative (``x * (1 - R+)``) regions at half size.
    ``forward(x, mode="segment")`` and ``forward(x, mask=m, mode="regions")`` expose the two
    halves, so that every pass goes through ``forward`` (as distributed wrappers require).
    """

    head_prefixes = ("headseg.", "cl32.")

    def __init__(
        self,
        name: str,
        num_classes: int,
        modalities: int = 5,
        kmax: float = 0.09,
        kmin: float = 0.09,
        alpha: float = 0.0,
        dropout: float = 0.0,
        sigma: float = 0.5,
        w: float = 8.0,
        scale: tuple[float, float] = (0.5, 0.5),
        mask_normalization: str = "batch",
        apply_min_term: bool = False,
        torchvision_weights: str | None = None,
    ) -> None:
        check_mask_normalization(mask_normalization)
        super().__init__(name, torchvision_weights)
        self.scale = tuple(scale)
        self.mask_normalization = mask_normalization
        self.register_buffer("sigma", torch.tensor([float(sigma)]))
        self.register_buffer("w", torch.tensor([float(w)]))
        head_args = (
            self.trunk_channels,
            num_classes,
            modalities,
            kmax,
            kmin,
            alpha,
            dropout,
            apply_min_term,
        )
        self.headseg = WildcatHead(*head_args)
        self.cl32 = WildcatHead(*head_args)

    def segment(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Localizer pass: ``(detached upsampled map B x 1 x H x W, scores, class maps)``."""
        scores, maps = self.headseg(self.trunk(x))
        posterior = torch.softmax(scores, dim=1)
        positive_map = torch.einsum("bc,bchw->bhw", posterior, maps).unsqueeze(1)
        upsampled = F.interpolate(
            positive_map, size=x.shape[-2:], mode="bilinear", align_corners=True
        )
        return upsampled.detach(), scores, maps

    def pseudo_binary_mask(
        self, continuous_map: torch.Tensor, eps: float = 1e-8, normalization: str | None = None
    ) -> torch.Tensor:
        """``sigmoid(w * (normalised map - sigma))``; min-max over the batch or per sample
        (``normalization``, by default the model's ``mask_normalization``)."""
        normalization = normalization or self.mask_normalization
        check_mask_normalization(normalization)
        normalised = minmax_normalise(continuous_map, normalization == "sample", eps)
        return torch.sigmoid(self.w * (normalised - self.sigma))

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier pass on ``x`` resized by ``scale``: ``(scores, class maps)``."""
        height, width = x.shape[-2:]
        size = (int(height * self.scale[0]), int(width * self.scale[1]))
        resized = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.cl32(self.trunk(resized))

    def classify_regions(
        self, x: torch.Tensor, mask: torch.Tensor, fused: bool = False, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Classify ``x * mask`` then ``x * (1 - mask)``: ``(pos scores, pos maps, neg ...)``.

        ``fused`` sends both regions through the network as one batch: faster, and equal up to
        float rounding in eval mode; in training it would mix their BatchNorm statistics.
        With ``seed``, torch is reseeded with it before each of the two passes, so both draw
        the same WILDCAT dropout mask (the recursive-erasing step does so).
        """
        if fused:
            if self.training:
                raise ValueError(
                    "fused region passes are for evaluation: in training they "
                    "would mix the BatchNorm statistics of the two regions"
                )
            scores, maps = self.classify(torch.cat([x * mask, x * (1 - mask)]))
            count = x.shape[0]
            return scores[:count], maps[:count], scores[count:], maps[count:]
        if seed is not None:
            torch.manual_seed(seed)
        pos_scores, pos_maps = self.classify(x * mask)
        if seed is not None:
            torch.manual_seed(seed)
        neg_scores, neg_maps = self.classify(x * (1 - mask))
        return pos_scores, pos_maps, neg_scores, neg_maps

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mode: str = "full",
        mask_normalization: str | None = None,
        fused_regions: bool = False,
        seed: int | None = None,
    ):
        """``full`` -> :class:`ModelOutput`; ``segment`` -> :meth:`segment`;
        ``regions`` -> :meth:`classify_regions` of ``x`` with ``mask`` (and ``seed``).

        ``mask_normalization`` (``batch`` / ``sample``) overrides the model's in ``full`` mode;
        evaluation uses ``sample`` so that a batch of images gives each one its batch-1 mask.
        ``fused_regions`` is passed to :meth:`classify_regions` (batched evaluation only).
        """
        if mode == "segment":
            return self.segment(x)
        if mode == "regions":
            return self.classify_regions(x, mask, seed=seed)
        if mode != "full":
            raise ValueError(f"unknown forward mode {mode!r}")
        continuous_map, seg_scores, seg_maps = self.segment(x)
        mask = self.pseudo_binary_mask(continuous_map, normalization=mask_normalization)
        regions = self.classify_regions(x, mask, fused=fused_regions)
        return ModelOutput(*regions, mask, seg_scores, seg_maps)


def build_model(model_config: dict) -> MinMaxEntropyNet:
    """Build the network from the validated ``model`` section of a configuration (weights not
    loaded)."""
    name = model_config["name"]
    return MinMaxEntropyNet(
        name=name,
        num_classes=model_config["num_classes"],
        modalities=model_config["modalities"],
        kmax=model_config["kmax"],
        kmin=model_config["kmin"],
        alpha=model_config["alpha"],
        dropout=model_config["dropout"],
        sigma=model_config["sigma"],
        w=model_config["w"],
        scale=tuple(model_config["scale"]),
        mask_normalization=model_config["mask_normalization"],
        apply_min_term=model_config["apply_min_term"],
        torchvision_weights=torchvision_weights(model_config),
    )
