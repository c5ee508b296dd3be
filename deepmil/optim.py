"""Optimizer construction and the per-epoch learning-rate schedule."""

from __future__ import annotations

import bisect

import torch
from torch import nn


def build_optimizer(model: nn.Module, optimizer_config: dict) -> torch.optim.Optimizer:
    """SGD (the paper's choice) or Adam over all parameters, in one parameter group, from the
    validated ``optimizer`` section."""
    name = optimizer_config["name"]
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=optimizer_config["lr"],
            momentum=optimizer_config["momentum"],
            dampening=optimizer_config["dampening"],
            weight_decay=optimizer_config["weight_decay"],
            nesterov=optimizer_config["nesterov"],
        )
    if name == "adam":
        return torch.optim.Adam(
            model.parameters(),
            lr=optimizer_config["lr"],
            betas=tuple(optimizer_config["betas"]),
            eps=optimizer_config["eps"],
            weight_decay=optimizer_config["weight_decay"],
            amsgrad=optimizer_config["amsgrad"],
        )
    raise ValueError(f"unknown optimizer {name!r}; expected 'sgd' or 'adam'")


def learning_rate(epoch: int, base_lr: float, scheduler_config: dict) -> float:
    """Learning rate used during (0-based) ``epoch``.

    The schedule is evaluated at ``k = max(epoch - 1, 0)``: the original training loop stepped
    its scheduler with the epoch index after each epoch, so epoch 0 and epoch 1 both use
    ``k = 0`` and every later change happens one epoch late. ``mystep`` is
    ``max(lr0 * gamma ** (k // step_size), min_lr)``; ``step`` is the same without the floor;
    ``multistep`` multiplies by ``gamma`` once per milestone ``<= k``.
    """
    k = max(epoch - 1, 0)
    name = scheduler_config["name"]
    gamma = scheduler_config["gamma"]
    if name == "mystep":
        return max(
            base_lr * gamma ** (k // scheduler_config["step_size"]), scheduler_config["min_lr"]
        )
    if name == "step":
        return base_lr * gamma ** (k // scheduler_config["step_size"])
    if name == "multistep":
        return base_lr * gamma ** bisect.bisect_right(sorted(scheduler_config["milestones"]), k)
    raise ValueError(f"unknown learning-rate scheduler {name!r}")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply ``lr`` to every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
