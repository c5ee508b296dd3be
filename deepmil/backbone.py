"""The ResNet backbones: deep-stem ResNets (the CSAIL ImageNet checkpoints' layout) and
torchvision ResNets, their trunk up to layer4, and the loading of their ImageNet weights."""

from __future__ import annotations

import math
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from deepmil.errors import WeightsError
from deepmil.registry import MODEL_NAMES

CSAIL_URL = "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/{name}-imagenet.pth"
DEEP_STEM_LAYERS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
}
TORCHVISION_MODELS = {
    "tv_resnet18": ("resnet18", "ResNet18_Weights"),
    "tv_resnet50": ("resnet50", "ResNet50_Weights"),
    "tv_resnet101": ("resnet101", "ResNet101_Weights"),
}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
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

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
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


def make_stage(
    block: type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int
) -> tuple[nn.Sequential, int]:
    """A ResNet stage; the first block gets a conv+BN shortcut when the shape changes."""
    outplanes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != outplanes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(outplanes),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(outplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), outplanes


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


def torchvision_weights(model_config: dict) -> str | None:
    """The torchvision weights a ``tv_resnet*`` with ``pretrained: true`` starts from."""
    if model_config.get("pretrained") is True and model_config["name"] in TORCHVISION_MODELS:
        return "IMAGENET1K_V1"
    return None


def pretrained_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the CSAIL ImageNet checkpoint of ``name`` is cached (and picked up if present)."""
    directory = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    return directory / f"{name}-imagenet.pth"


def download_pretrained(name: str, cache_dir: str | Path | None = None) -> dict:
    """Fetch (or reuse from the cache) the CSAIL ImageNet state dict of a deep-stem trunk."""
    url = CSAIL_URL.format(name=name)
    path = pretrained_path(name, cache_dir)
    try:
        return torch.hub.load_state_dict_from_url(
            url,
            model_dir=str(path.parent),
            map_location="cpu",
            file_name=path.name,
            weights_only=True,
        )
    except (URLError, OSError) as error:
        raise WeightsError(
            f"could not download the ImageNet weights of {name} from {url} ({error}). "
            f"Download that file by hand and place it at {path}, or set "
            f"model.pretrained: false."
        ) from error


def load_trunk_weights(model: ResNetTrunk, state_dict: dict) -> None:
    """Load ImageNet trunk weights, checking that every trunk tensor was found.

    Only ``fc.*`` entries may be left unused, and only the heads (``model.head_prefixes``), the
    ``sigma``/``w`` buffers and BatchNorm ``num_batches_tracked`` counters may be missing;
    anything else is an error.
    """
    result = model.load_state_dict(state_dict, strict=False)
    unexpected = [key for key in result.unexpected_keys if not key.startswith("fc.")]
    missing = [
        key
        for key in result.missing_keys
        if not key.startswith(model.head_prefixes)
        and key not in ("sigma", "w")
        and not key.endswith("num_batches_tracked")
    ]
    if unexpected or missing:
        raise WeightsError(
            f"pretrained weights do not match the {model.name} trunk: "
            f"missing trunk keys {missing}, unexpected keys {unexpected}"
        )


def load_pretrained_trunk(model: ResNetTrunk, cache_dir: str | Path | None = None) -> None:
    """Download (or reuse) and load the CSAIL ImageNet weights into a deep-stem model."""
    load_trunk_weights(model, download_pretrained(model.name, cache_dir))
