"""Numerical precision of a run, built once: autocast, the fp16 gradient scaler, memory format."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from deepmil.errors import ConfigError

LOGGER = logging.getLogger(__name__)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str | None, device: torch.device) -> None:
    """Refuse an unknown ``amp`` value, and ``fp16`` off CUDA (CPU autocast lacks fp16 ops)."""
    if amp is not None and amp not in AMP_DTYPES:
        raise ConfigError(
            f"amp = {amp!r} is not an allowed value (expected null, 'bf16' or 'fp16')"
        )
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"amp = 'fp16' needs a CUDA device (float16 autocast is not supported "
            f"for all operations on {device.type}); use amp: bf16 or null"
        )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def warn_if_emulated(amp: str | None, device: torch.device) -> None:
    """Warn that ``bf16`` autocast on a CPU without native bfloat16 is emulated, and slow."""
    if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        LOGGER.warning(
            "amp = 'bf16' on a CPU without native bfloat16 instructions (AVX512-BF16 or AMX): "
            "autocast emulates them and runs many times slower than float32; "
            "use amp: null (--set amp=null; pretrain.amp for the synthetic trunk)"
        )


@dataclass(frozen=True)
class Precision:
    """How forward and backward passes run: ``amp`` (``None``, ``bf16``, ``fp16``) autocast on
    ``device_type``, the gradient scaler of ``fp16``, and channels-last images.

    Build it with :meth:`build`, which checks ``amp`` against the device once. The default is
    float32 with no scaler.
    """

    amp: str | None = None
    device_type: str = "cpu"
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = field(default=None, compare=False)

    @classmethod
    def build(cls, amp: str | None, device: torch.device, channels_last: bool = False) -> Precision:
        """The precision of ``amp`` on ``device``, with a fresh scaler for ``fp16``."""
        check_amp(amp, device)
        warn_if_emulated(amp, device)
        scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        return cls(amp, device.type, channels_last, scaler)

    def autocast(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to the dtype of ``amp``; nothing for float32 or ``enabled=False``."""
        if self.amp is None or not enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=AMP_DTYPES[self.amp])

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the fp16 gradient scaler when there is one."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, unscaled (and the scale updated) under the fp16 scaler."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def to_device(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Move a batch of images to ``device``, in channels-last memory format if asked."""
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        return images.to(device, non_blocking=True, memory_format=memory_format)


FLOAT32 = Precision()
