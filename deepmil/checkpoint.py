"""Atomic checkpoint files, resumable training state and loading of user checkpoints."""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Callable

import torch
from torch import nn


def _file_mode() -> int:
    """Permissions of a new file under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def _os_error(error: BaseException) -> OSError | None:
    """``error`` if it is an ``OSError``, else the ``OSError`` it was raised while handling.

    ``torch.save`` turns a failing ``write`` (disk full...) into a ``RuntimeError`` whose context
    is the original ``OSError``.
    """
    while isinstance(error, Exception) and not isinstance(error, OSError):
        error = error.__context__
    return error if isinstance(error, OSError) else None


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs (in the main thread; elsewhere no
    handler can run anyway): the first one received is handled right after the block, by the
    handler that was in place, and a second one meanwhile is not handled twice."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda number, _: received.append(number))
                for signum in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            else:
                signal.raise_signal(received[0])


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, fsync, then rename.

    A crash or a failing write leaves any previous ``path`` untouched and no partial file; a
    failing write (disk full...) is an ``OSError`` naming ``path``. The file gets the usual
    permissions (``mkstemp`` would leave it readable by its owner only). SIGINT and SIGTERM
    wait until the file is in place, so an interruption never stops a write half-way.
    """
    with signals_deferred():
        _atomic_write(Path(path), write)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """:func:`atomic_write` without the signal deferral."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        cause = _os_error(error)
        if cause is None:
            raise
        raise OSError(cause.errno, f"cannot write {path}: {cause.strerror or cause}") from error


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda stream: torch.save(obj, stream))


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                   best: dict[str, Any], history: list[dict],
                   scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
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
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "best": best, "history": history}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


TRAINING_STATE_KEYS = ("epoch", "model", "optimizer", "best", "history")


def read_training_state(path: Path) -> dict[str, Any]:
    """The resumable state of :func:`training_state` stored in ``path``; a file of another kind
    (e.g. bare weights) is an error naming it."""
    state = read_checkpoint(path)
    missing = [key for key in TRAINING_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint (no {', '.join(missing)}); it "
                         f"may hold bare weights, which --path_pre_trained loads instead")
    return state


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file on the CPU, with a clear error if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {path} cannot be read ({error})") from error


def load_model_weights(model: nn.Module, path: Path, strict: bool = True) -> None:
    """Load a state dict (or the ``model`` entry of a training checkpoint) into ``model``.

    A checkpoint of another architecture or class count is an error naming the file and the
    mismatching keys.
    """
    state = read_checkpoint(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state dict (a mapping of names to tensors)")
    own = model.state_dict()
    wrong_shapes = [f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                    for key, value in state.items()
                    if key in own and tuple(value.shape) != tuple(own[key].shape)]
    if wrong_shapes:
        raise ValueError(f"checkpoint {path} does not fit this model (different architecture "
                         f"or class count?): " + "; ".join(wrong_shapes[:5]))
    result = model.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(f"checkpoint {path} does not fit this model: missing keys "
                         f"{result.missing_keys[:5]}, unexpected keys "
                         f"{result.unexpected_keys[:5]} (use --strict false to allow this)")
