"""The min-max entropy model: a shared ResNet trunk, a WILDCAT localizer head and a WILDCAT
classifier head applied to the positive and negative regions of the image."""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple
from urllib.error import URLError

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deepmil.errors import WeightsError
from deepmil.registry import MASK_NORMALIZATIONS, MODEL_NAMES
from deepmil.pooling import ClassWisePool, WildcatPool2d

CSAIL_URL = "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/{name}-imagenet.pth"
DEEP_STEM_LAYERS = {"resnet18": ("basic", [2, 2, 2, 2]),
                    "resnet50": ("bottleneck", [3, 4, 6, 3]),
                    "resnet101": ("bottleneck", [3, 4, 23, 3])}
TORCHVISION_MODELS = {"tv_resnet18": ("resnet18", "ResNet18_Weights"),
                      "tv_resnet50": ("resnet50", "ResNet50_Weights"),
                      "tv_resnet101": ("resnet101", "ResNet101_Weights")}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck with a residual connection (ResNet-50/101)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int,
               stride: int) -> tuple[nn.Sequential, int]:
    """A ResNet stage; the first block gets a conv+BN shortcut when the shape changes."""
    outplanes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != outplanes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(outplanes))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(outplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), outplanes


class WildcatHead(nn.Module):
    """1x1 convolution to ``C*M`` modality maps, class-wise averaging, WILDCAT spatial pooling.

    Returns ``(scores B x C, class maps B x C x h x w)``.
    """

    def __init__(self, in_channels: int, num_classes: int, modalities: int, kmax: float,
                 kmin: float, alpha: float, dropout: float, apply_min_term: bool = False) -> None:
        super().__init__()
        self.to_modalities = nn.Conv2d(in_channels, num_classes * modalities, kernel_size=1,
                                       bias=True)
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
        raise ValueError(f"unknown mask normalization {normalization!r}; "
                         f"expected one of {MASK_NORMALIZATIONS}")


class ResNetTrunk(nn.Module):
    """A ResNet trunk (deep-stem ``resnet*`` or torchvision ``tv_resnet*``) up to layer4.

    Its layers are attributes of the network itself (``conv1``, ``layer1``...), so state-dict keys
    match the ImageNet checkpoints. Subclasses add heads and list their name prefixes in
    ``head_prefixes`` (the keys that ImageNet weights do not provide).
    """

    head_prefixes: tuple[str, ...] = ()

    def __init__(self, name: str, torchvision_weights: str | None = None) -> None:
        super().__init__()
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown model name {name!r}; expected one of {MODEL_NAMES}")
        self.name = name
        self.deep_stem = name in DEEP_STEM_LAYERS
        if self.deep_stem:
            self.trunk_channels = self._build_deep_stem_trunk(*DEEP_STEM_LAYERS[name])
        else:
            self.trunk_channels = self._adopt_torchvision_trunk(name, torchvision_weights)

    def _build_deep_stem_trunk(self, block_name: str, layers: list[int]) -> int:
        """Deep-stem (3x3 64-64-128) ResNet, He fan-out initialised; returns layer4 channels."""
        block = BLOCKS[block_name]
        self.conv1 = conv3x3(3, 64, stride=2)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = conv3x3(64, 64)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = conv3x3(64, 128)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 128
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage, inplanes = make_stage(block, inplanes, planes, blocks, 1 if index == 0 else 2)
            setattr(self, f"layer{index + 1}", stage)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        return inplanes

    def _adopt_torchvision_trunk(self, name: str, weights: str | None) -> int:
        """Take the trunk of a torchvision ResNet (7x7 stem); returns layer4 channels."""
        builder_name, weights_enum = TORCHVISION_MODELS[name]
        tv_weights = getattr(torchvision.models, weights_enum)[weights] if weights else None
        network = getattr(torchvision.models, builder_name)(weights=tv_weights)
        for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, part, getattr(network, part))
        return network.fc.in_features

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Layer4 features (stride 32)."""
        x = self.relu(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class MinMaxEntropyNet(ResNetTrunk):
    """Shared ResNet trunk with a localizer head (``headseg``) and a classifier head (``cl32``).

    ``forward(x)`` runs the localizer on ``x``, builds the pseudo-binary mask ``R+`` and
    classifies the positive (``x * R+``) and negative (``x * (1 - R+)``) regions at half size.
    ``forward(x, mode="segment")`` and ``forward(x, mask=m, mode="regions")`` expose the two
    halves, so that every pass goes through ``forward`` (as distributed wrappers require).
    """

    head_prefixes = ("headseg.", "cl32.")

    def __init__(self, name: str, num_classes: int, modalities: int = 5, kmax: float = 0.09,
                 kmin: float = 0.09, alpha: float = 0.0, dropout: float = 0.0,
                 sigma: float = 0.5, w: float = 8.0, scale: tuple[float, float] = (0.5, 0.5),
                 mask_normalization: str = "batch", apply_min_term: bool = False,
                 torchvision_weights: str | None = None) -> None:
        check_mask_normalization(mask_normalization)
        super().__init__(name, torchvision_weights)
        self.scale = tuple(scale)
        self.mask_normalization = mask_normalization
        self.register_buffer("sigma", torch.tensor([float(sigma)]))
        self.register_buffer("w", torch.tensor([float(w)]))
        head_args = (self.trunk_channels, num_classes, modalities, kmax, kmin, alpha, dropout,
                     apply_min_term)
        self.headseg = WildcatHead(*head_args)
        self.cl32 = WildcatHead(*head_args)

    def segment(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Localizer pass: ``(detached upsampled map B x 1 x H x W, scores, class maps)``."""
        scores, maps = self.headseg(self.trunk(x))
        posterior = torch.softmax(scores, dim=1)
        positive_map = torch.einsum("bc,bchw->bhw", posterior, maps).unsqueeze(1)
        upsampled = F.interpolate(positive_map, size=x.shape[-2:], mode="bilinear",
                                  align_corners=True)
        return upsampled.detach(), scores, maps

    def pseudo_binary_mask(self, continuous_map: torch.Tensor, eps: float = 1e-8,
                           normalization: str | None = None) -> torch.Tensor:
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

    def classify_regions(self, x: torch.Tensor, mask: torch.Tensor, fused: bool = False,
                         seed: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Classify ``x * mask`` then ``x * (1 - mask)``: ``(pos scores, pos maps, neg ...)``.

        ``fused`` sends both regions through the network as one batch: faster, and equal up to
        float rounding in eval mode; in training it would mix their BatchNorm statistics.
        With ``seed``, torch is reseeded with it before each of the two passes, so both draw
        the same WILDCAT dropout mask (the recursive-erasing step does so).
        """
        if fused:
            if self.training:
                raise ValueError("fused region passes are for evaluation: in training they "
                                 "would mix the BatchNorm statistics of the two regions")
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "full",
                mask_normalization: str | None = None, fused_regions: bool = False,
                seed: int | None = None):
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


def torchvision_weights(model_config: dict) -> str | None:
    """The torchvision weights a ``tv_resnet*`` with ``pretrained: true`` starts from."""
    if model_config.get("pretrained") and model_config["name"] in TORCHVISION_MODELS:
        return "IMAGENET1K_V1"
    return None


def build_model(model_config: dict) -> MinMaxEntropyNet:
    """Build the network from the validated ``model`` section of a configuration (weights not
    loaded)."""
    name = model_config["name"]
    return MinMaxEntropyNet(
        name=name, num_classes=model_config["num_classes"],
        modalities=model_config["modalities"], kmax=model_config["kmax"],
        kmin=model_config["kmin"], alpha=model_config["alpha"],
        dropout=model_config["dropout"], sigma=model_config["sigma"], w=model_config["w"],
        scale=tuple(model_config["scale"]),
        mask_normalization=model_config["mask_normalization"],
        apply_min_term=model_config["apply_min_term"],
        torchvision_weights=torchvision_weights(model_config))


def pretrained_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the CSAIL ImageNet checkpoint of ``name`` is cached (and picked up if present)."""
    directory = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    return directory / f"{name}-imagenet.pth"


def download_pretrained(name: str, cache_dir: str | Path | None = None) -> dict:
    """Fetch (or reuse from the cache) the CSAIL ImageNet state dict of a deep-stem trunk."""
    url = CSAIL_URL.format(name=name)
    path = pretrained_path(name, cache_dir)
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=str(path.parent),
                                                  map_location="cpu", file_name=path.name,
                                                  weights_only=True)
    except (URLError, OSError) as error:
        raise WeightsError(
            f"could not download the ImageNet weights of {name} from {url} ({error}). "
            f"Download that file by hand and place it at {path}, or set "
            f"model.pretrained: false.") from error


def load_trunk_weights(model: ResNetTrunk, state_dict: dict) -> None:
    """Load ImageNet trunk weights, checking that every trunk tensor was found.

    Only ``fc.*`` entries may be left unused, and only the heads (``model.head_prefixes``), the
    ``sigma``/``w`` buffers and BatchNorm ``num_batches_tracked`` counters may be missing;
    anything else is an error.
    """
    result = model.load_state_dict(state_dict, strict=False)
    unexpected = [key for key in result.unexpected_keys if not key.startswith("fc.")]
    missing = [key for key in result.missing_keys
               if not key.startswith(model.head_prefixes)
               and key not in ("sigma", "w") and not key.endswith("num_batches_tracked")]
    if unexpected or missing:
        raise WeightsError(f"pretrained weights do not match the {model.name} trunk: "
                           f"missing trunk keys {missing}, unexpected keys {unexpected}")


def load_pretrained_trunk(model: ResNetTrunk, cache_dir: str | Path | None = None) -> None:
    """Download (or reuse) and load the CSAIL ImageNet weights into a deep-stem model."""
    load_trunk_weights(model, download_pretrained(model.name, cache_dir))
