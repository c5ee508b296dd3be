"""Training step (with recursive erasing), training epoch and evaluation loop."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from deepmil.baselines import scores_and_localization
from deepmil.crf import refine_with_crf
from deepmil.distributed import (all_reduce_sum, any_process, average_gradients,
                                 broadcast_buffers, gather_objects, no_sync)
from deepmil.geometry import restore_mask_geometry
from deepmil.losses import classifier_loss, localizer_loss, negative_loss, positive_loss
from deepmil.metrics import (LocalizationMeter, MetricSettings, PxAPMeter, ThresholdSweepMeter,
                             all_ones_f1, f1_pos_neg, iou_at)
from deepmil.model import ModelOutput
from loader import load_rgb
from reproducibility import iteration_seed


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Raised when training diverges: a loss term, a weight or an evaluated score or mask is NaN
    or infinite."""


def check_amp(amp: str | None, device: torch.device) -> None:
    """Refuse an unknown ``amp`` value, and ``fp16`` off CUDA (CPU autocast lacks fp16 ops)."""
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp = {amp!r} is not an allowed value (expected null, 'bf16' or "
                         f"'fp16')")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"amp = 'fp16' needs a CUDA device (float16 autocast is not supported "
                         f"for all operations on {device.type}); use amp: bf16 or null")


def autocast(device: torch.device, amp: str | None) -> ContextManager:
    """``torch.autocast`` to the dtype of ``amp`` (``bf16`` / ``fp16``), nothing for ``None``."""
    check_amp(amp, device)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """``loss.backward()``, through the fp16 gradient scaler when there is one."""
    (loss if scaler is None else scaler.scale(loss)).backward()


def to_device(tensor: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Move a batch of images to ``device``, in channels-last memory format if asked."""
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    return tensor.to(device, non_blocking=True, memory_format=memory_format)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a distributed / data-parallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def seeded_forward(model: nn.Module, seed: int, *args, **kwargs):
    """Reseed torch before a forward pass, so WILDCAT dropout depends only on ``seed``."""
    torch.manual_seed(seed)
    return model(*args, **kwargs)


def plain_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int,
               amp: str | None = None, scaler: torch.amp.GradScaler | None = None
               ) -> dict[str, torch.Tensor]:
    """One localizer pass and two region passes; backward of ``L_seg + L_pos + L_neg``.

    With ``amp`` the forward pass runs under autocast and the losses in float32.
    """
    with autocast(images.device, amp):
        out = seeded_forward(model, seed, images)
    loss_seg = localizer_loss(out.seg_scores.float(), labels)
    loss_pos = positive_loss(out.pos_scores.float(), labels)
    loss_neg = negative_loss(out.neg_scores.float())
    backward(loss_seg + loss_pos + loss_neg, scaler)
    return {"loss_seg": loss_seg.detach(), "loss_seg_pass_mean": loss_seg.detach(),
            "loss_pos": loss_pos.detach(), "loss_neg": loss_neg.detach(),
            "scores": out.pos_scores.detach().float()}


def erasing_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int,
                 nbr_times_erase: int, sigma_erase: float, amp: str | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> dict[str, torch.Tensor]:
    """Recursive (accumulative) erasing for one mini-batch; gradients accumulate, no step.

    Up to ``nbr_times_erase`` localizer passes run on progressively erased images. A sample's
    mask enters the accumulated mask ``A`` (element-wise running max) weighted by its trust
    ``exp(-t / sigma_erase) * 1[correct] * 1[loss <= loss at t=0] * max posterior``; a sample
    that is misclassified once is trusted no more. Only trusted samples are erased. The
    positive and negative regions are then built from the original images with ``A``.
    Every localizer pass and each of the two region passes starts from the iteration
    ``seed``, so they all draw the same dropout mask.

    ``loss_seg`` is the sum of the passes' ``L_seg`` divided by ``nbr_times_erase + 1``
    whatever the number of passes that ran (the value the original training logs show);
    ``loss_seg_pass_mean`` is their mean. Gradients do not depend on either. With ``amp`` the
    forward passes run under autocast; losses and masks stay in float32.
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
        with autocast(images.device, amp):
            continuous_map, seg_scores, _ = seeded_forward(model, seed, current, mode="segment")
        mask = network.pseudo_binary_mask(continuous_map.float())
        seg_scores = seg_scores.float()
        per_sample = localizer_loss(seg_scores, labels, reduction="none")
        backward(per_sample.mean(), scaler)
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
    with autocast(images.device, amp):
        pos_scores, _, neg_scores, _ = model(images, mask=accumulated, mode="regions", seed=seed)
    pos_scores = pos_scores.float()
    loss_pos = positive_loss(pos_scores, labels)
    loss_neg = negative_loss(neg_scores.float())
    backward(loss_pos + loss_neg, scaler)
    seg_losses = torch.stack(seg_losses)
    return {"loss_seg": seg_losses.sum() / (nbr_times_erase + 1),
            "loss_seg_pass_mean": seg_losses.mean(), "loss_pos": loss_pos.detach(),
            "loss_neg": loss_neg.detach(), "scores": pos_scores.detach(),
            "erasing_passes": torch.tensor(len(seg_losses))}


def classifier_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int,
                    amp: str | None = None, scaler: torch.amp.GradScaler | None = None
                    ) -> dict[str, torch.Tensor]:
    """A baseline's step: backward of the cross-entropy ``L_cl`` of its class scores."""
    with autocast(images.device, amp):
        out = seeded_forward(model, seed, images)
    scores = out.scores.float()
    loss_cl = classifier_loss(scores, labels)
    backward(loss_cl, scaler)
    return {"loss_cl": loss_cl.detach(), "scores": scores.detach()}


def erasing_active(epoch: int, nbr_times_erase: int, epoch_start_erasing: int) -> bool:
    """Recursive erasing runs in training only, from ``epoch_start_erasing`` on, if ``u > 0``."""
    return nbr_times_erase > 0 and epoch >= epoch_start_erasing


LOSS_TERMS = ("loss_seg", "loss_pos", "loss_neg")
BASELINE_LOSS_TERMS = ("loss_cl",)
EXTRA_LOGGED = ("loss_seg_pass_mean",)


def loss_terms(method: str) -> tuple[str, ...]:
    """Names of the loss terms that ``method`` trains with."""
    return LOSS_TERMS if method == "minmax" else BASELINE_LOSS_TERMS


def extra_logged(method: str) -> tuple[str, ...]:
    """Names of the logged values of ``method``'s step that are not loss terms."""
    return EXTRA_LOGGED if method == "minmax" else ()


def check_finite(values: list[float], epoch: int, batch: int,
                 names: tuple[str, ...] = LOSS_TERMS) -> None:
    """Stop on a NaN/inf loss term, naming the epoch, the batch and every term's value."""
    if not all(math.isfinite(value) for value in values):
        terms = ", ".join(f"{name}={value:.4g}" for name, value in zip(names, values))
        raise NonFiniteLossError(f"non-finite training loss at epoch {epoch}, batch {batch}: "
                                 f"{terms}")


def check_finite_weights(model: nn.Module, epoch: int) -> None:
    """Stop when a parameter of ``model`` holds a NaN/inf after ``epoch``, naming the first few."""
    parameters = list(unwrap(model).named_parameters())
    finite = torch.stack([parameter.detach().isfinite().all() for _, parameter in parameters])
    if not bool(finite.all()):
        names = [name for (name, _), ok in zip(parameters, finite.tolist()) if not ok]
        raise NonFiniteLossError(f"non-finite weights after epoch {epoch} (training diverged): "
                                 f"{', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))


def check_finite_outputs(scores: torch.Tensor, masks: torch.Tensor, source: object,
                         batch: int) -> None:
    """Stop when an evaluated batch (of the images listed in ``source``) has NaN/inf class
    scores or mask values."""
    if not bool(scores.isfinite().all() & masks.isfinite().all()):
        raise NonFiniteLossError(f"non-finite class scores or mask values when evaluating "
                                 f"{source}, batch {batch} (training diverged)")


def train_one_epoch(model: nn.Module, loader: Iterable[dict], optimizer: torch.optim.Optimizer,
                    epoch: int, seed: int, device: torch.device, nbr_times_erase: int,
                    sigma_erase: float, erase: bool,
                    on_batch: Callable[[dict[str, float]], None] | None = None,
                    amp: str | None = None, scaler: torch.amp.GradScaler | None = None,
                    channels_last: bool = False, method: str = "minmax") -> dict[str, float]:
    """Train for one epoch; returns the epoch's mean losses and training error (%).

    ``method`` other than ``minmax`` trains a baseline with :func:`classifier_step`. ``amp``
    (``bf16`` / ``fp16``) runs the forward passes under autocast; ``scaler`` (for ``fp16``)
    scales the losses and steps the optimizer; ``channels_last`` sends the images in
    channels-last memory format (the model should be converted too).
    """
    model.train()
    names, extras = loss_terms(method), extra_logged(method)
    totals = torch.zeros(len(names) + len(extras) + 3, dtype=torch.float64, device=device)
    for batch_index, batch in enumerate(loader):
        seed_i = iteration_seed(seed, epoch, batch_index)
        images = to_device(batch["image"], device, channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        if method != "minmax":
            stats = classifier_step(model, images, labels, seed_i, amp, scaler)
        elif erase:
            with no_sync(model):
                stats = erasing_step(model, images, labels, seed_i, nbr_times_erase,
                                     sigma_erase, amp, scaler)
            average_gradients(model)
        else:
            stats = plain_step(model, images, labels, seed_i, amp, scaler)
        logged = torch.stack([stats[name] for name in names + extras])
        values = logged.tolist()[:len(names)]
        check_finite(values, epoch, batch_index, names)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        errors = (stats["scores"].argmax(dim=1) != labels).sum()
        loss = logged[:len(names)].sum().view(1)
        totals += torch.cat([torch.cat([loss, logged]) * labels.numel(),
                             errors.view(1), torch.ones(1, device=device) * labels.numel()])
        if on_batch is not None:
            on_batch({"loss": sum(values)})
    check_finite_weights(model, epoch)
    loss, *logged_sums, errors, samples = all_reduce_sum(totals).tolist()
    return {"loss": loss / samples,
            **{name: total / samples for name, total in zip(names + extras, logged_sums)},
            "cl_error": 100.0 * errors / samples}


class Evaluation(NamedTuple):
    """Result of :func:`evaluate`."""

    summary: dict[str, float]
    records: list[dict]
    sweep: ThresholdSweepMeter
    pxap: PxAPMeter


def minmax_outputs(network: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   batched: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Scores of ``R+``, the mask ``R+`` and per-image losses of the min-max entropy model.

    The mask is min-max normalised per image, as in a batch of one, whatever the batch size;
    ``batched`` also sends the positive and negative regions through the network together.
    """
    out = network(images, mask_normalization="sample", fused_regions=batched)
    out = ModelOutput(*(tensor.float() for tensor in out))
    losses = {"loss_seg": localizer_loss(out.seg_scores, labels, reduction="none"),
              "loss_pos": positive_loss(out.pos_scores, labels, reduction="none"),
              "loss_neg": negative_loss(out.neg_scores, reduction="none")}
    return out.pos_scores, out.mask, losses


def baseline_outputs(network: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     method: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Scores, localisation map and per-image ``L_cl`` of a baseline (see deepmil.baselines)."""
    scores, mask = scores_and_localization(method, network, images)
    scores = scores.float()
    return scores, mask, {"loss_cl": classifier_loss(scores, labels, reduction="none")}


@torch.no_grad()
def predictions(network: nn.Module, loader: Iterable[dict], device: torch.device,
                exact_crop: bool, amp: str | None = None, channels_last: bool = False,
                method: str = "minmax") -> Iterator[dict]:
    """Per-image predictions: the localisation at the ground-truth geometry, class, losses.

    The localisation is ``R+`` for ``minmax`` and the baseline's map otherwise. With ``amp`` the
    forward pass runs under autocast (Grad-CAM excepted); its outputs are cast to float32. A
    loader of batches larger than one (``eval_batch_size``) evaluates in batches: images and
    regions go through the network together, which equals image by image up to float rounding.
    """
    geometry = loader.dataset.geometry
    source = getattr(loader.dataset, "csv_path", "the evaluation set")
    batched = (loader.batch_size or 1) > 1
    for batch_index, batch in enumerate(loader):
        images = to_device(batch["image"], device, channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast(device, None if method == "gradcam" else amp):
            if method == "minmax":
                scores, masks, losses = minmax_outputs(network, images, labels, batched)
            else:
                scores, masks, losses = baseline_outputs(network, images, labels, method)
        masks = masks.float()
        check_finite_outputs(scores, masks, source, batch_index)
        losses["loss"] = sum(losses.values())
        confidence, predicted = torch.softmax(scores, dim=1).max(dim=1)
        per_image = {name: value.tolist() for name, value in losses.items()}
        confidence, predicted = confidence.tolist(), predicted.tolist()
        for row, label in enumerate(labels.tolist()):
            index = int(batch["index"][row])
            shape = geometry[index]
            yield {"index": index, "label": label, "predicted": predicted[row],
                   "probability": confidence[row],
                   "losses": {name: values[row] for name, values in per_image.items()},
                   "mask": restore_mask_geometry(masks[row], shape.padded, shape.upscaled,
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


def empty_dice_cases(item: dict) -> int:
    """How many of the image's F1+ and F1- are a Dice of two empty sets (0, 1 or 2)."""
    predicted, truth = item["mask"] >= 0.5, item["truth"] >= 0.5
    both_empty = not (predicted.any() or truth.any())
    both_full = bool(predicted.all() and truth.all())
    return int(both_empty) + int(both_full)


def image_row(item: dict, empty: float = 1.0) -> tuple:
    """The per-image numbers that make up a summary (``index`` first, for ordering);
    ``empty`` is the Dice and IoU of two empty sets."""
    f1_pos, f1_neg = f1_pos_neg(item["mask"], item["truth"], empty=empty)
    ones_pos, _ = all_ones_f1(item["truth"], empty)
    row = {"f1_pos": float(f1_pos), "f1_neg": float(f1_neg),
           "iou": float(iou_at(item["mask"], item["truth"], empty=empty)),
           "f1_pos_all_ones": float(ones_pos), "empty_dice": empty_dice_cases(item),
           "correct": item["predicted"] == item["label"], "losses": item["losses"]}
    if "crf_mask" in item:
        crf_pos, crf_neg = f1_pos_neg(item["crf_mask"], item["truth"], empty=empty)
        row.update(crf_f1_pos=float(crf_pos), crf_f1_neg=float(crf_neg),
                   crf_iou=float(iou_at(item["crf_mask"], item["truth"], empty=empty)))
    return item["index"], row


def summarise(rows: Iterable[tuple]) -> dict[str, float]:
    """Per-image means over all processes' rows, summed in image order, and the number of
    F1 values that are a Dice of two empty sets (``n_empty_dice``)."""
    meter, crf_meter = LocalizationMeter(), LocalizationMeter()
    rows = sorted(gather_objects(list(rows)), key=lambda item: item[0])
    for _, row in rows:
        meter.update(row["f1_pos"], row["f1_neg"], row["correct"], row["losses"],
                     f1_pos_all_ones=row["f1_pos_all_ones"], iou=row["iou"])
        if "crf_f1_pos" in row:
            crf_meter.update(row["crf_f1_pos"], row["crf_f1_neg"], row["correct"],
                             iou=row["crf_iou"])
    summary = meter.compute()
    summary["n_empty_dice"] = sum(row["empty_dice"] for _, row in rows)
    if crf_meter.n_images:
        crf = crf_meter.compute()
        summary.update({f"crf_{key}": crf[key] for key in ("f1_pos", "f1_neg", "iou", "top1_loc")})
    return summary


def evaluate(model: nn.Module, loader: Iterable[dict], device: torch.device,
             exact_crop: bool = False, keep: int = 0, crf: Callable | None = None,
             crf_workers: int = 0, amp: str | None = None,
             channels_last: bool = False, method: str = "minmax",
             metrics: MetricSettings = MetricSettings()) -> Evaluation:
    """Evaluate (no erasing) with the default forward pass, image by image or in batches of
    same-size images (with per-image mask normalisation: the same results).

    The predicted class is ``argmax`` of the positive region's scores and the localisation is
    ``R+`` brought back to the ground-truth geometry, thresholded at 0.5 (F1+, F1-, IoU), plus
    the threshold-free PxAP and a threshold sweep, both on ``R+``. With ``crf`` (e.g.
    ``tools.CRF``) the CRF-refined mask is scored too (``crf_*`` keys). Under
    ``torch.distributed`` each process evaluates its shard and the per-image results are
    gathered and summed in image order, so the summary equals a single-process evaluation.
    ``records`` holds the first ``keep`` predictions of this process (masks on the CPU) and
    ``pxap`` the set's counts of ``R+`` values per bin outside / inside the ground truth.
    ``amp``, ``channels_last`` and ``method`` are as in :func:`train_one_epoch`; a baseline is
    scored on its own map instead of ``R+``. ``metrics`` sets the empty-set Dice and the PxAP
    bins.
    """
    network = unwrap(model).eval()
    broadcast_buffers(network)
    stream = predictions(network, loader, device, exact_crop, amp, channels_last, method)
    if crf is not None:
        stream = with_crf(stream, loader, crf, crf_workers)
    pxap, sweep = PxAPMeter(metrics.pxap_interval), ThresholdSweepMeter(empty=metrics.empty)
    rows, records = [], []
    for item in stream:
        rows.append(image_row(item, metrics.empty))
        pxap.update(item["mask"], item["truth"])
        sweep.update(item["mask"], item["truth"])
        if len(records) < keep:
            records.append({key: value.cpu() if torch.is_tensor(value) else value
                            for key, value in item.items()} | dict(rows[-1][1]))
    pxap.reduce(all_reduce_sum)
    sweep.reduce(all_reduce_sum)
    summary = summarise(rows)
    summary["pxap"] = pxap.compute()
    return Evaluation(summary, records, sweep, pxap)
