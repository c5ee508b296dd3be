"""Atomic checkpoint files, resumable training state and loading of user checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepmil.errors import CheckpointError
from deepmil.files import atomic_write


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda stream: torch.save(obj, stream))


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    best: dict[str, Any],
    history: list[dict],
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Everything needed to continue training after ``epoch`` (0-based) has finished, with the
    fp16 gradient scaler's state when there is one.

    The weights of the best epoch are not repeated here: ``best_model.pt`` is written after the
    checkpoint of that epoch, so when ``best["epoch"] == epoch`` they are this ``model``.
    No random-generator state is stored because none carries over between epochs: every
    training step reseeds torch from (seed, epoch, step) before the only random operation of
    the model (WILDCAT dropout), the shuffling of each epoch comes from a sampler seeded by
    (seed, epoch), each sample's augmentation from a generator seeded by (seed, epoch, index),
    and the learning rate is a closed form of the epoch. (The loaders' own generators advance
    every epoch but only seed the workers' global generators, which nothing draws from.)
    """
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "best": best,
        "history": history,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


TRAINING_STATE_KEYS = ("epoch", "model", "optimizer", "best", "history")


def read_training_state(path: Path) -> dict[str, Any]:
    """The resumable state of :func:`training_state` stored in ``path``; a file of another kind
    (e.g. bare weights) is an error naming it."""
    state = read_checkpoint(path)
    missing = [
        key for key in TRAINING_STATE_KEYS if not isinstance(state, dict) or key not in state
    ]
    if missing:
        raise CheckpointError(
            f"{path} is not a training checkpoint (no {', '.join(missing)}); it "
            f"may hold bare weights, which --path_pre_trained loads instead"
        )
    return state


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file on the CPU, with a clear error if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({error})") from error


def load_model_weights(model: nn.Module, path: Path, strict: bool = True) -> None:
    """Load a state dict (or the ``model`` entry of a training checkpoint) into ``model``.

    A checkpoint of another architecture or class count is an error naming the file and the
    mismatching keys.
    """
    state = read_checkpoint(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict (a mapping of names to tensors)"
        )
    own = model.state_dict()
    wrong_shapes = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if wrong_shapes:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (different architecture "
            f"or class count?): " + "; ".join(wrong_shapes[:5])
        )
    result = model.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing keys "
            f"{result.missing_keys[:5]}, unexpected keys "
            f"{result.unexpected_keys[:5]} (use --strict false to allow this)"
        )
