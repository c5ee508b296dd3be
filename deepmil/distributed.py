"""Multi-process training with ``torch.distributed`` (launched by ``torchrun``).

Each process trains on its own shard of every epoch with a per-process batch of ``batch_size``
images (effective batch: ``batch_size * world_size``). The plain training step relies on
``DistributedDataParallel``'s gradient reduction. The recursive-erasing step runs several
backward passes per optimizer step, some of which leave one head unused, so it runs entirely
under ``no_sync`` and its accumulated gradients are averaged once with
:func:`average_gradients`; ``find_unused_parameters`` is therefore never needed. Its loop stops
only when no sample of any process is still trusted, as it would on the whole batch in one
process, so every process runs the same number of passes (SyncBN needs that).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepmil.errors import ConfigError

LOGGER = logging.getLogger(__name__)
SYNC_BN_ENV = "ACTIVATE_SYNC_BN"


def is_distributed() -> bool:
    """Whether a process group of more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class DistributedContext:
    """Rank, world size and device of this process (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the process was started with more than one process by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """This process's GPU index on its machine (``LOCAL_RANK`` set by ``torchrun``)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0, or not launched by ``torchrun`` (usable before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(use_cuda: bool) -> DistributedContext:
    """Join the process group set up by ``torchrun`` (NCCL on GPUs, Gloo on CPU)."""
    if not launched_by_torchrun():
        return DistributedContext()
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank())


def shutdown_distributed(context: DistributedContext) -> None:
    """Leave the process group."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def sync_bn_requested() -> bool:
    """``ACTIVATE_SYNC_BN``: unset means on; when set, only the string ``"True"`` means on."""
    value = os.environ.get(SYNC_BN_ENV)
    return value is None or value == "True"


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Synchronised BatchNorm on GPUs when ``ACTIVATE_SYNC_BN`` allows it; plain BN on CPU."""
    if not sync_bn_requested():
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if is_main_process():
        LOGGER.warning("synchronised BatchNorm needs GPUs; plain BatchNorm is used on CPU")
    return model


def wrap_model(model: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    """SyncBN (if requested) and ``DistributedDataParallel`` when distributed.

    Buffers are synchronised at construction but not at every forward pass; evaluation aligns
    them with :func:`broadcast_buffers`.
    """
    if not context.enabled:
        return model
    model = convert_batchnorm(model, device)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for a wrapped model, a no-op otherwise."""
    return (
        model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    )


def average_gradients(model: nn.Module) -> None:
    """Average every parameter's gradient over the processes with one all-reduce."""
    if not is_distributed():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics)."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def any_process(flag: torch.Tensor) -> bool:
    """Whether ``flag`` (a boolean scalar tensor) is true on at least one process."""
    flag = flag.float()
    if is_distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every process (``value`` itself when not distributed)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over processes, in place (NCCL: through a GPU copy)."""
    if is_distributed():
        if dist.get_backend() == "nccl" and not tensor.is_cuda:
            on_gpu = tensor.cuda()
            dist.all_reduce(on_gpu)
            tensor.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(tensor)
    return tensor


def gather_objects(items: list[Any]) -> Iterator[Any]:
    """Concatenation of every process's ``items`` (``items`` itself when not distributed)."""
    if not is_distributed():
        return iter(items)
    gathered: list[list[Any]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return (item for part in gathered for item in part)


def select_device(cudaid: str | None) -> torch.device:
    """``None``: the first GPU if there is one, else the CPU; ``"cpu"``; or a GPU index.

    Under ``torchrun`` each process takes the GPU of its local rank (unless ``cpu``).
    """
    if launched_by_torchrun() and cudaid != "cpu":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{local_rank()}")
    if cudaid is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if cudaid == "cpu":
        return torch.device("cpu")
    if "," in cudaid:
        raise ConfigError(
            f"--cudaid {cudaid}: several GPUs are used through torchrun, e.g. "
            f"'torchrun --nproc_per_node=2 train_deepmil.py ...'"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--cudaid {cudaid}: no GPU is visible; use --cudaid cpu")
    if not cudaid.isdigit() or int(cudaid) >= count:
        raise ConfigError(
            f"--cudaid {cudaid}: no such GPU ({count} visible); use --cudaid cpu "
            f"or an index below {count}"
        )
    return torch.device(f"cuda:{cudaid}")
