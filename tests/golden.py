"""Golden values of the default min-max numerics, and the command that regenerates them.

A seeded ResNet-18 min-max model (WILDCAT dropout on, float64) and a seeded batch of three
96-px images give: the train-mode outputs of one default forward pass, the three losses and
the parameter gradients of one plain step and of one recursive-erasing step (4 passes), and
the eval-mode mask. ``tests/test_golden.py`` recomputes them and compares at 1e-6.

Regenerate (only when a change of the numerics is intended, and say so in the commit)::

    python -m tests.golden --write
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from deepmil.engine import erasing_step, plain_step
from deepmil.model import MinMaxEntropyNet

GOLDEN_PATH = Path(__file__).resolve().parent / "data" / "golden_minmax.npz"
SEED, ITERATION_SEED = 0, 12345
BATCH, SIZE, CLASSES = 3, 96, 2
ERASE_PASSES, SIGMA_ERASE = 4, 10.0
LABELS = (1, 0, 1)
SUBSAMPLE = 8


def build_case() -> tuple[MinMaxEntropyNet, torch.Tensor, torch.Tensor]:
    """The seeded network (train mode, float64), its input batch and the labels."""
    torch.manual_seed(SEED)
    net = (
        MinMaxEntropyNet("resnet18", CLASSES, modalities=2, kmax=0.5, kmin=0.5, dropout=0.5)
        .double()
        .train()
    )
    generator = torch.Generator().manual_seed(SEED)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    return net, images, torch.tensor(LABELS)


def gradient_statistics(net: torch.nn.Module) -> np.ndarray:
    """Per parameter (in ``named_parameters`` order): sum, sum of squares and the projection
    on a fixed random vector of its gradient, then the gradients are cleared."""
    generator = torch.Generator().manual_seed(SEED)
    rows = []
    for _, parameter in net.named_parameters():
        grad = parameter.grad.detach().double().flatten()
        direction = torch.randn(grad.numel(), generator=generator, dtype=torch.float64)
        rows.append([grad.sum().item(), grad.square().sum().item(), grad.dot(direction).item()])
        parameter.grad = None
    return np.array(rows)


def step_values(
    prefix: str, stats: dict[str, torch.Tensor], net: torch.nn.Module
) -> dict[str, np.ndarray]:
    """A step's logged losses and gradient statistics, under ``prefix``."""
    losses = [stats[name].item() for name in ("loss_seg", "loss_pos", "loss_neg")]
    return {
        f"{prefix}_losses": np.array(losses),
        f"{prefix}_scores": stats["scores"].numpy(),
        f"{prefix}_gradients": gradient_statistics(net),
    }


def compute_golden_values() -> dict[str, np.ndarray]:
    """Every golden value, recomputed from the seeded case."""
    net, images, labels = build_case()
    values = {"images_checksum": np.array([images.sum().item(), images.square().sum().item()])}
    torch.manual_seed(ITERATION_SEED)
    out = net(images)
    values.update(
        train_pos_scores=out.pos_scores.detach().numpy(),
        train_neg_scores=out.neg_scores.detach().numpy(),
        train_seg_scores=out.seg_scores.detach().numpy(),
        train_mask=out.mask.detach()[..., ::SUBSAMPLE, ::SUBSAMPLE].numpy(),
    )
    values.update(step_values("plain", plain_step(net, images, labels, ITERATION_SEED), net))
    erasing = erasing_step(net, images, labels, ITERATION_SEED, ERASE_PASSES, SIGMA_ERASE)
    values.update(step_values("erasing", erasing, net))
    values["erasing_passes"] = np.array([int(erasing["erasing_passes"])])
    net.eval()
    with torch.no_grad():
        out = net(images, mask_normalization="sample")
    values.update(
        eval_pos_scores=out.pos_scores.numpy(),
        eval_mask=out.mask[..., ::SUBSAMPLE, ::SUBSAMPLE].numpy(),
    )
    return values


def mismatches(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], tolerance: float = 1e-6
) -> list[str]:
    """The names of the values that differ (absolute and relative tolerance ``tolerance``)."""
    names = sorted(set(actual) | set(expected))
    return [
        name
        for name in names
        if name not in actual
        or name not in expected
        or actual[name].shape != expected[name].shape
        or not np.allclose(actual[name], expected[name], rtol=tolerance, atol=tolerance)
    ]


def load_golden_values(path: Path = GOLDEN_PATH) -> dict[str, np.ndarray]:
    """The stored golden values."""
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--write",
        action="store_true",
        help=f"recompute the golden values and overwrite {GOLDEN_PATH.name}",
    )
    args = parser.parse_args()
    values = compute_golden_values()
    if args.write:
        GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(GOLDEN_PATH, **values)
        print(f"wrote {GOLDEN_PATH} ({GOLDEN_PATH.stat().st_size} bytes)")
    else:
        differing = mismatches(values, load_golden_values())
        print(
            "golden values differ: " + ", ".join(differing) if differing else "golden values match"
        )


if __name__ == "__main__":
    main()
