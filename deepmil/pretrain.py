"""Pretrain a deep-stem trunk on the synthetic source task, offline and deterministically.

    python -m deepmil.pretrain [--model resnet18] [--cache DIR] [--force]

The trunk is trained as a plain classifier (global average pooling, a linear layer,
cross-entropy) on :mod:`deepmil.source` and saved with the key names of the CSAIL ImageNet
checkpoints (``conv1.weight`` ... ``layer4.*``, ``fc.weight``, ``fc.bias``), so it loads through
the same key check (``deepmil.backbone.load_trunk_weights``). The file is cached (torch hub's
``checkpoints`` folder, or ``model.pretrained_cache``) under a name that holds the digest of its
specification, so it is built once and rebuilt only when the specification changes; a JSON file
beside it records the specification, the training accuracy and the file's sha256, which is checked
on every load. ``model.pretrained: synthetic`` selects it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deepmil import files
from deepmil.backbone import ResNetTrunk, load_trunk_weights
from deepmil.baselines import CAMNet
from deepmil.config import default_values
from deepmil.errors import DeepMILError, WeightsError
from deepmil.losses import classifier_loss
from deepmil.precision import Precision, cpu_has_native_bf16
from deepmil.registry import DEEP_STEM_MODELS
from deepmil.source import SourceSpec, render_source_image

LOGGER = logging.getLogger(__name__)
PRETRAIN_VERSION = 1


def resolve_amp(amp: str | None) -> str | None:
    """``auto``: bf16 on a CPU that computes it natively (about twice as fast as float32 on 2
    cores), float32 (None) elsewhere, where bf16 is emulated and far slower; others as given."""
    if amp != "auto":
        return amp
    return "bf16" if cpu_has_native_bf16() else None


@dataclass(frozen=True)
class PretrainSpec:
    """What determines a pretrained trunk: the trunk, the source set and how it is trained
    (SGD with Nesterov momentum 0.9, a cosine learning-rate decay, random flips, on the CPU,
    in float32 or under ``amp`` autocast). Its values come from the
    configuration's ``pretrain`` section (:meth:`from_config`), with ``amp: auto`` resolved for
    this CPU, so that the resolved value names the cached trunk."""

    model: str
    source: SourceSpec
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    amp: str | None

    @classmethod
    def from_config(cls, section: Mapping[str, Any], model: str) -> PretrainSpec:
        """The specification of the validated ``pretrain`` section, for trunk ``model``."""
        source = SourceSpec(
            section["num_classes"],
            section["per_class"],
            section["image_size"],
            section["source_seed"],
        )
        return cls(
            model,
            source,
            section["epochs"],
            section["batch_size"],
            section["lr"],
            section["weight_decay"],
            section["seed"],
            resolve_amp(section["amp"]),
        )

    def __post_init__(self) -> None:
        if self.model not in DEEP_STEM_MODELS:
            raise WeightsError(
                f"the synthetic trunk is for deep-stem models ({', '.join(DEEP_STEM_MODELS)}), "
                f"not {self.model!r}"
            )

    def to_json(self) -> str:
        """The specification as canonical JSON (with the source and pretraining versions)."""
        record = {**asdict(self), "source": self.source.record(), "version": PRETRAIN_VERSION}
        return json.dumps(record, sort_keys=True)

    @property
    def digest(self) -> str:
        """sha256 of :meth:`to_json`."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


def trunk_path(spec: PretrainSpec, cache_dir: str | Path | None = None) -> Path:
    """Where the trunk of ``spec`` is cached."""
    directory = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    return directory / f"{spec.model}-synthetic-{spec.digest[:16]}.pth"


def record_path(path: Path) -> Path:
    """The JSON record beside a cached trunk."""
    return path.with_suffix(".json")


def sha256_of(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_tensors(spec: SourceSpec, quiet: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every source image (``n x 3 x h x w`` uint8) and its class."""
    images, labels = [], []
    for index in tqdm(range(spec.size), desc="rendering the source set", disable=quiet or None):
        image, label = render_source_image(spec, index)
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to the float inputs of every loader: ``(x / 255 - 0.5) / 0.5``."""
    return images.float().div(255).sub(0.5).div(0.5)


def random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image left-right and up-down, each with probability 0.5."""
    flips = torch.rand(images.shape[0], 2, generator=generator) < 0.5
    images = torch.where(flips[:, 0, None, None, None], images.flip(-1), images)
    return torch.where(flips[:, 1, None, None, None], images.flip(-2), images)


def cosine_lr(base: float, step: int, steps: int) -> float:
    """Cosine decay from ``base`` to 0 over ``steps`` steps."""
    return 0.5 * base * (1.0 + math.cos(math.pi * step / steps))


def train_classifier(spec: PretrainSpec, quiet: bool = False) -> tuple[CAMNet, float]:
    """Train the trunk and its linear classifier on the source set; returns the network and the
    last epoch's training accuracy (%)."""
    images, labels = source_tensors(spec.source, quiet)
    torch.manual_seed(spec.seed)
    network = CAMNet(spec.model, spec.source.num_classes).train()
    optimizer = torch.optim.SGD(
        network.parameters(),
        lr=spec.lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=spec.weight_decay,
    )
    precision = Precision.build(spec.amp, torch.device("cpu"))
    batches = math.ceil(len(labels) / spec.batch_size)
    accuracy = 0.0
    for epoch in range(spec.epochs):
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
        order = torch.randperm(len(labels), generator=generator)
        correct = 0
        progress = tqdm(
            range(batches), desc=f"pretraining epoch {epoch}", leave=False, disable=quiet or None
        )
        for batch in progress:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(spec.lr, epoch * batches + batch, spec.epochs * batches)
            chosen = order[batch * spec.batch_size : (batch + 1) * spec.batch_size]
            inputs = random_flips(normalise(images[chosen]), generator)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                scores = network(inputs).scores.float()
            loss = classifier_loss(scores, labels[chosen])
            loss.backward()
            optimizer.step()
            correct += int((scores.argmax(dim=1) == labels[chosen]).sum())
            progress.set_postfix(loss=f"{loss.item():.3f}")
        accuracy = 100.0 * correct / len(labels)
        LOGGER.info(
            "pretraining epoch %d/%d: training accuracy %.2f%%", epoch, spec.epochs - 1, accuracy
        )
    return network, accuracy


def checkpoint_state(network: CAMNet) -> dict[str, torch.Tensor]:
    """The network's state dict in the CSAIL layout: trunk keys as they are, the classifier as
    ``fc``."""
    return {
        key.replace("classifier.", "fc.", 1) if key.startswith("classifier.") else key: value
        for key, value in network.state_dict().items()
    }


def build_trunk(spec: PretrainSpec, path: Path, quiet: bool = False) -> Path:
    """Pretrain, then write the trunk and its JSON record (each atomically) to ``path``."""
    began = time.perf_counter()
    LOGGER.info(
        "pretraining a %s trunk on the synthetic source task (%d classes, %d images)",
        spec.model,
        spec.source.num_classes,
        spec.source.size,
    )
    network, accuracy = train_classifier(spec, quiet)
    state = checkpoint_state(network)
    files.atomic_write(path, lambda stream: torch.save(state, stream))
    record = {
        "spec": json.loads(spec.to_json()),
        "train_accuracy": accuracy,
        "seconds": round(time.perf_counter() - began, 1),
        "sha256": sha256_of(path),
    }
    files.write_json(record, record_path(path))
    LOGGER.info("wrote %s (%.0f s, training accuracy %.2f%%)", path, record["seconds"], accuracy)
    return path


def ensure_trunk(
    spec: PretrainSpec, cache_dir: str | Path | None = None, quiet: bool = False
) -> Path:
    """The cached trunk of ``spec``, pretrained first when it is not there."""
    path = trunk_path(spec, cache_dir)
    if path.is_file() and record_path(path).is_file():
        return path
    return build_trunk(spec, path, quiet)


def read_trunk(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a cached trunk, refused when its bytes differ from the recorded sha256
    or it cannot be read."""
    rebuild = f"delete {path} and {record_path(path).name} to pretrain it again"
    try:
        expected = json.loads(record_path(path).read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(
            f"the record of the synthetic trunk {path} cannot be read ({error}); {rebuild}"
        ) from None
    if sha256_of(path) != expected:
        raise WeightsError(
            f"the synthetic trunk {path} does not match its recorded sha256 "
            f"(corrupted or replaced); {rebuild}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(
            f"the synthetic trunk {path} cannot be read ({error}); {rebuild}"
        ) from None


def load_synthetic_trunk(
    model: ResNetTrunk, spec: PretrainSpec, cache_dir: str | Path | None = None
) -> Path:
    """Load the synthetic pretrained trunk of ``spec`` into ``model`` (pretraining it on first
    use) with the key check of the ImageNet weights; returns the file."""
    path = ensure_trunk(spec, cache_dir)
    try:
        load_trunk_weights(model, read_trunk(path))
    except WeightsError as error:
        error.add_note(f"file: {path}")
        raise
    LOGGER.info("loaded the synthetic pretrained trunk %s", path)
    return path


def pretrained_trunk_record(config: Mapping[str, Any]) -> dict[str, Any]:
    """The file and sha256 of the synthetic pretrained trunk a run starts from (if any): the
    recorded sha256, which :func:`read_trunk` checked against the file when the run loaded it,
    so the file is not hashed a second time."""
    model = config["model"]
    if model["pretrained"] != "synthetic":
        return {}
    spec = PretrainSpec.from_config(config["pretrain"], model["name"])
    path = trunk_path(spec, model["pretrained_cache"])
    recorded = json.loads(record_path(path).read_text(encoding="utf-8"))["sha256"]
    return {"pretrained_trunk": {"path": str(path), "sha256": recorded}}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: build (or find) the trunk and print where it is."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=DEEP_STEM_MODELS)
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder of the cached trunks (default: torch hub's checkpoints)",
    )
    parser.add_argument("--force", action="store_true", help="pretrain again even if cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        spec = PretrainSpec.from_config(default_values()["pretrain"], args.model)
        path = trunk_path(spec, args.cache)
        if args.force or not path.is_file():
            build_trunk(spec, path, args.quiet)
        read_trunk(path)
    except (DeepMILError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{path}\nsha256 {sha256_of(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
