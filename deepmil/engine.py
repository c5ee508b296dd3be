"""Training step (with recursive erasing), training epoch and evaluation loop."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from deepmil.losses import localizer_loss, negative_loss, positive_loss
from deepmil.metrics import LocalizationMeter, all_ones_f1, f1_pos_neg, restore_mask_geometry
from reproducibility import iteration_seed


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss term is NaN or infinite."""


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a distributed / data-parallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def seeded_forward(model: nn.Module, seed: int, *args, **kwargs):
    """Reseed torch before a forward pass, so WILDCAT dropout depends only on ``seed``."""
    torch.manual_seed(seed)
    return model(*args, **kwargs)


def plain_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               seed: int) -> dict[str, torch.Tensor]:
    """One localizer pass and two region passes; backward of ``L_seg + L_pos + L_neg``."""
    out = seeded_forward(model, seed, images)
    loss_seg = localizer_loss(out.seg_scores, labels)
    loss_pos = positive_loss(out.pos_scores, labels)
    loss_neg = negative_loss(out.neg_scores)
    (loss_seg + loss_pos + loss_neg).backward()
    return {"loss_seg": loss_seg.detach(), "loss_pos": loss_pos.detach(),
            "loss_neg": loss_neg.detach(), "pos_scores": out.pos_scores.detach()}


def erasing_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int,
                 nbr_times_erase: int, sigma_erase: float
                 ) -> dict[str, torch.Tensor]:
    """Recursive (accumulative) erasing for one mini-batch; gradients accumulate, no step.

    Up to ``nbr_times_erase`` localizer passes run on progressively erased images. A sample's
    mask enters the accumulated mask ``A`` (element-wise running max) weighted by its trust
    ``exp(-t / sigma_erase) * 1[correct] * 1[loss <= loss at t=0] * max posterior``; a sample
    that is misclassified once is trusted no more. Only trusted samples are erased. The
    positive and negative regions are then built from the original images with ``A``.
    """
    network = unwrap(model)
    current = images
    accumulated = torch.zeros_like(images[:, :1])
    history = torch.ones_like(labels, dtype=torch.bool)
    reference_loss = None
    seg_losses = []
    for t in range(nbr_times_erase):
        if t > 0 and not bool(history.any()):
            break
        continuous_map, seg_scores, _ = seeded_forward(model, seed, current, mode="segment")
        mask = network.pseudo_binary_mask(continuous_map)
        per_sample = localizer_loss(seg_scores, labels, reduction="none")
        per_sample.mean().backward()
        with torch.no_grad():
            per_sample = per_sample.detach()
            seg_losses.append(per_sample.mean())
            confidence, predicted = torch.softmax(seg_scores.detach(), dim=1).max(dim=1)
            if reference_loss is None:
                reference_loss = per_sample
            correct = predicted == labels
            history &= correct
            trusted = history & (per_sample <= reference_loss)
            trust = math.exp(-t / sigma_erase) * confidence * trusted
            accumulated = torch.maximum(accumulated, trust.view(-1, 1, 1, 1) * mask)
            erase = (trust != 0).view(-1, 1, 1, 1)
            current = torch.where(erase, current * (1 - accumulated), current)
    pos_scores, _, neg_scores, _ = seeded_forward(model, seed, images, mask=accumulated,
                                                  mode="regions")
    loss_pos = positive_loss(pos_scores, labels)
    loss_neg = negative_loss(neg_scores)
    (loss_pos + loss_neg).backward()
    return {"loss_seg": torch.stack(seg_losses).mean(), "loss_pos": loss_pos.detach(),
            "loss_neg": loss_neg.detach(), "pos_scores": pos_scores.detach(),
            "erasing_passes": torch.tensor(len(seg_losses))}


def erasing_active(epoch: int, nbr_times_erase: int, epoch_start_erasing: int) -> bool:
    """Recursive erasing runs in training only, from ``epoch_start_erasing`` on, if ``u > 0``."""
    return nbr_times_erase > 0 and epoch >= epoch_start_erasing


def check_finite(stats: dict[str, torch.Tensor], epoch: int, batch: int) -> None:
    """Stop on a NaN/inf loss term, naming the epoch, the batch and every term's value."""
    terms = torch.stack([stats["loss_seg"], stats["loss_pos"], stats["loss_neg"]])
    if not bool(torch.isfinite(terms).all()):
        values = ", ".join(f"{name}={float(stats[name]):.4g}"
                           for name in ("loss_seg", "loss_pos", "loss_neg"))
        raise NonFiniteLossError(f"non-finite training loss at epoch {epoch}, batch {batch}: "
                                 f"{values}")


def train_one_epoch(model: nn.Module, loader: Iterable[dict], optimizer: torch.optim.Optimizer,
                    epoch: int, seed: int, device: torch.device, nbr_times_erase: int,
                    sigma_erase: float, erase: bool,
                    on_batch: Callable[[dict[str, float]], None] | None = None
                    ) -> dict[str, float]:
    """Train for one epoch; returns the epoch's mean losses and training error (%)."""
    model.train()
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    errors = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    for batch_index, batch in enumerate(loader):
        seed_i = iteration_seed(seed, epoch, batch_index)
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        if erase:
            stats = erasing_step(model, images, labels, seed_i, nbr_times_erase, sigma_erase)
        else:
            stats = plain_step(model, images, labels, seed_i)
        check_finite(stats, epoch, batch_index)
        optimizer.step()
        size = labels.numel()
        terms = torch.stack([stats["loss_seg"], stats["loss_pos"], stats["loss_neg"]])
        totals += torch.cat([terms.sum().view(1), terms]).double() * size
        errors += (stats["pos_scores"].argmax(dim=1) != labels).sum()
        samples += size
        if on_batch is not None:
            on_batch({"loss": float(terms.sum())})
    means = (totals / samples).tolist()
    return {"loss": means[0], "loss_seg": means[1], "loss_pos": means[2], "loss_neg": means[3],
            "cl_error": 100.0 * float(errors) / samples}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict], device: torch.device,
             exact_crop: bool = False, keep: int = 0) -> tuple[dict[str, float], list[dict]]:
    """Evaluate image by image (batch 1, no erasing) with the default forward pass.

    The predicted class is ``argmax`` of the positive region's scores and the localisation is
    ``R+`` brought back to the ground-truth geometry, thresholded at 0.5. Returns the
    :class:`LocalizationMeter` summary and, for the first ``keep`` images, a record with the
    restored continuous mask, the ground truth, the label, the prediction and its probability.
    """
    model.eval()
    geometry = loader.dataset.geometry
    meter = LocalizationMeter()
    records = []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        out = model(images)
        for row in range(labels.numel()):
            index = int(batch["index"][row])
            shape = geometry[index]
            mask = restore_mask_geometry(out.mask[row], shape.padded, shape.upscaled,
                                         shape.original, exact=exact_crop)
            truth = batch["mask"][row].to(device)
            f1_pos, f1_neg = f1_pos_neg(mask, truth)
            ones_pos, _ = all_ones_f1(truth)
            one = slice(row, row + 1)
            losses = {"loss_seg": localizer_loss(out.seg_scores[one], labels[one]),
                      "loss_pos": positive_loss(out.pos_scores[one], labels[one]),
                      "loss_neg": negative_loss(out.neg_scores[one])}
            losses["loss"] = sum(losses.values())
            probabilities = torch.softmax(out.pos_scores[row], dim=0)
            predicted = int(probabilities.argmax())
            label = int(labels[row])
            meter.update(float(f1_pos), float(f1_neg), predicted == label,
                         {name: float(value) for name, value in losses.items()},
                         f1_pos_all_ones=float(ones_pos))
            if len(records) < keep:
                records.append({"index": index, "label": label, "predicted": predicted,
                                "probability": float(probabilities[predicted]),
                                "mask": mask.cpu(), "truth": truth.cpu(),
                                "f1_pos": float(f1_pos), "f1_neg": float(f1_neg)})
    return meter.summary(), records
