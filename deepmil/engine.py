"""Training step (with recursive erasing), training epoch and evaluation loop."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from deepmil.distributed import (all_reduce_sum, any_process, average_gradients,
                                 broadcast_buffers, gather_objects, no_sync)
from deepmil.losses import localizer_loss, negative_loss, positive_loss
from deepmil.metrics import (LocalizationMeter, PxAPMeter, ThresholdSweepMeter, all_ones_f1,
                             f1_pos_neg, iou_at, refine_with_crf, restore_mask_geometry)
from loader import load_rgb
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
        if t > 0 and not any_process(history.any()):
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
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    for batch_index, batch in enumerate(loader):
        seed_i = iteration_seed(seed, epoch, batch_index)
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        if erase:
            with no_sync(model):
                stats = erasing_step(model, images, labels, seed_i, nbr_times_erase,
                                     sigma_erase)
            average_gradients(model)
        else:
            stats = plain_step(model, images, labels, seed_i)
        check_finite(stats, epoch, batch_index)
        optimizer.step()
        terms = torch.stack([stats["loss_seg"], stats["loss_pos"], stats["loss_neg"]])
        errors = (stats["pos_scores"].argmax(dim=1) != labels).sum()
        totals += torch.cat([torch.cat([terms.sum().view(1), terms]) * labels.numel(),
                             errors.view(1), torch.ones(1, device=device) * labels.numel()])
        if on_batch is not None:
            on_batch({"loss": float(terms.sum())})
    loss, loss_seg, loss_pos, loss_neg, errors, samples = all_reduce_sum(totals).tolist()
    return {"loss": loss / samples, "loss_seg": loss_seg / samples, "loss_pos": loss_pos / samples,
            "loss_neg": loss_neg / samples, "cl_error": 100.0 * errors / samples}


class Evaluation(NamedTuple):
    """Result of :func:`evaluate`."""

    summary: dict[str, float]
    records: list[dict]
    sweep: ThresholdSweepMeter


@torch.no_grad()
def predictions(network: nn.Module, loader: Iterable[dict], device: torch.device,
                exact_crop: bool) -> Iterator[dict]:
    """Per-image predictions: ``R+`` at the ground-truth geometry, class, losses."""
    geometry = loader.dataset.geometry
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        out = network(images)
        for row in range(labels.numel()):
            index = int(batch["index"][row])
            shape = geometry[index]
            one = slice(row, row + 1)
            losses = {"loss_seg": localizer_loss(out.seg_scores[one], labels[one]),
                      "loss_pos": positive_loss(out.pos_scores[one], labels[one]),
                      "loss_neg": negative_loss(out.neg_scores[one])}
            losses["loss"] = sum(losses.values())
            probabilities = torch.softmax(out.pos_scores[row], dim=0)
            predicted = int(probabilities.argmax())
            yield {"index": index, "label": int(labels[row]), "predicted": predicted,
                   "probability": float(probabilities[predicted]),
                   "losses": {name: float(value) for name, value in losses.items()},
                   "mask": restore_mask_geometry(out.mask[row], shape.padded, shape.upscaled,
                                                 shape.original, exact=exact_crop),
                   "truth": batch["mask"][row].to(device)}


def with_crf(stream: Iterable[dict], loader, crf: Callable, workers: int) -> Iterator[dict]:
    """Add ``crf_mask`` (the CRF-refined ``R+``) to each prediction, CRF in worker processes."""
    paths = loader.dataset.image_paths
    items = ((item, np.asarray(load_rgb(paths[item["index"]])), item["mask"][0].cpu().numpy())
             for item in stream)
    for item, refined in refine_with_crf(crf, items, workers):
        item["crf_mask"] = torch.from_numpy(refined)[None].to(item["mask"].device)
        yield item


def image_row(item: dict) -> tuple:
    """The per-image numbers that make up a summary (``index`` first, for ordering)."""
    f1_pos, f1_neg = f1_pos_neg(item["mask"], item["truth"])
    ones_pos, _ = all_ones_f1(item["truth"])
    row = {"f1_pos": float(f1_pos), "f1_neg": float(f1_neg),
           "iou": float(iou_at(item["mask"], item["truth"])), "f1_pos_all_ones": float(ones_pos),
           "correct": item["predicted"] == item["label"], "losses": item["losses"]}
    if "crf_mask" in item:
        crf_pos, crf_neg = f1_pos_neg(item["crf_mask"], item["truth"])
        row.update(crf_f1_pos=float(crf_pos), crf_f1_neg=float(crf_neg),
                   crf_iou=float(iou_at(item["crf_mask"], item["truth"])))
    return item["index"], row


def summarise(rows: Iterable[tuple]) -> dict[str, float]:
    """Per-image means over all processes' rows, summed in image order."""
    meter, crf_meter = LocalizationMeter(), LocalizationMeter()
    for _, row in sorted(gather_objects(list(rows)), key=lambda item: item[0]):
        meter.update(row["f1_pos"], row["f1_neg"], row["correct"], row["losses"],
                     f1_pos_all_ones=row["f1_pos_all_ones"], iou=row["iou"])
        if "crf_f1_pos" in row:
            crf_meter.update(row["crf_f1_pos"], row["crf_f1_neg"], row["correct"],
                             iou=row["crf_iou"])
    summary = meter.summary()
    if crf_meter.n_images:
        crf = crf_meter.summary()
        summary.update({f"crf_{key}": crf[key] for key in ("f1_pos", "f1_neg", "iou", "top1_loc")})
    return summary


def evaluate(model: nn.Module, loader: Iterable[dict], device: torch.device,
             exact_crop: bool = False, keep: int = 0, crf: Callable | None = None,
             crf_workers: int = 0) -> Evaluation:
    """Evaluate image by image (batch 1, no erasing) with the default forward pass.

    The predicted class is ``argmax`` of the positive region's scores and the localisation is
    ``R+`` brought back to the ground-truth geometry, thresholded at 0.5 (F1+, F1-, IoU), plus
    the threshold-free PxAP and a threshold sweep, both on ``R+``. With ``crf`` (e.g.
    ``tools.CRF``) the CRF-refined mask is scored too (``crf_*`` keys). Under
    ``torch.distributed`` each process evaluates its shard and the per-image results are
    gathered and summed in image order, so the summary equals a single-process evaluation.
    ``records`` holds the first ``keep`` predictions of this process (masks on the CPU).
    """
    network = unwrap(model).eval()
    broadcast_buffers(network)
    stream = predictions(network, loader, device, exact_crop)
    if crf is not None:
        stream = with_crf(stream, loader, crf, crf_workers)
    pxap, sweep = PxAPMeter(), ThresholdSweepMeter()
    rows, records = [], []
    for item in stream:
        rows.append(image_row(item))
        pxap.update(item["mask"], item["truth"])
        sweep.update(item["mask"], item["truth"])
        if len(records) < keep:
            records.append({key: value.cpu() if torch.is_tensor(value) else value
                            for key, value in item.items()} | dict(rows[-1][1]))
    all_reduce_sum(pxap.counts)
    all_reduce_sum(sweep.sums)
    sweep.n_images = int(all_reduce_sum(torch.tensor(sweep.n_images)))
    summary = summarise(rows)
    summary["pxap"] = pxap.compute()
    return Evaluation(summary, records, sweep)
