"""Training step (with recursive erasing), training epoch and evaluation loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from deepmil.crf import refine_with_crf
from deepmil.distributed import all_reduce_sum, any_process, broadcast_buffers, gather_objects
from deepmil.errors import NonFiniteLossError
from deepmil.geometry import restore_mask_geometry
from deepmil.losses import classifier_loss, localizer_loss, negative_loss, positive_loss
from deepmil.metrics import (
    LocalizationMeter,
    MetricSettings,
    PxAPMeter,
    ThresholdSweepMeter,
    all_ones_f1,
    error_rate,
    f1_pos_neg,
    iou_at,
    misclassified,
)
from deepmil.precision import FLOAT32, Precision
from reproducibility import iteration_seed

if TYPE_CHECKING:
    from deepmil.settings import RunSettings


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a distributed / data-parallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def seeded_forward(model: nn.Module, seed: int, *args, **kwargs):
    """Reseed torch before a forward pass, so WILDCAT dropout depends only on ``seed``."""
    torch.manual_seed(seed)
    return model(*args, **kwargs)


def plain_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    precision: Precision = FLOAT32,
) -> dict[str, torch.Tensor]:
    """One localizer pass and two region passes; backward of ``L_seg + L_pos + L_neg``.

    The forward pass runs under ``precision``'s autocast and the losses in float32.
    """
    with precision.autocast():
        out = seeded_forward(model, seed, images)
    loss_seg = localizer_loss(out.seg_scores.float(), labels)
    loss_pos = positive_loss(out.pos_scores.float(), labels)
    loss_neg = negative_loss(out.neg_scores.float())
    precision.backward(loss_seg + loss_pos + loss_neg)
    return {
        "loss_seg": loss_seg.detach(),
        "loss_seg_pass_mean": loss_seg.detach(),
        "loss_pos": loss_pos.detach(),
        "loss_neg": loss_neg.detach(),
        "scores": out.pos_scores.detach().float(),
    }


def erasing_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    nbr_times_erase: int,
    sigma_erase: float,
    precision: Precision = FLOAT32,
) -> dict[str, torch.Tensor]:
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
    ``loss_seg_pass_mean`` is their mean. Gradients do not depend on either. The forward
    passes run under ``precision``'s autocast; losses and masks stay in float32.
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
        with precision.autocast():
            continuous_map, seg_scores, _ = seeded_forward(model, seed, current, mode="segment")
        mask = network.pseudo_binary_mask(continuous_map.float())
        seg_scores = seg_scores.float()
        per_sample = localizer_loss(seg_scores, labels, reduction="none")
        precision.backward(per_sample.mean())
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
    with precision.autocast():
        pos_scores, _, neg_scores, _ = model(images, mask=accumulated, mode="regions", seed=seed)
    pos_scores = pos_scores.float()
    loss_pos = positive_loss(pos_scores, labels)
    loss_neg = negative_loss(neg_scores.float())
    precision.backward(loss_pos + loss_neg)
    seg_losses = torch.stack(seg_losses)
    return {
        "loss_seg": seg_losses.sum() / (nbr_times_erase + 1),
        "loss_seg_pass_mean": seg_losses.mean(),
        "loss_pos": loss_pos.detach(),
        "loss_neg": loss_neg.detach(),
        "scores": pos_scores.detach(),
        "erasing_passes": torch.tensor(len(seg_losses)),
    }


def classifier_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    precision: Precision = FLOAT32,
) -> dict[str, torch.Tensor]:
    """A baseline's step: backward of the cross-entropy ``L_cl`` of its class scores."""
    with precision.autocast():
        out = seeded_forward(model, seed, images)
    scores = out.scores.float()
    loss_cl = classifier_loss(scores, labels)
    precision.backward(loss_cl)
    return {"loss_cl": loss_cl.detach(), "scores": scores.detach()}


def check_finite(values: list[float], epoch: int, batch: int, names: tuple[str, ...]) -> None:
    """Stop on a NaN/inf loss term, naming the epoch, the batch and every term's value."""
    if not all(math.isfinite(value) for value in values):
        terms = ", ".join(f"{name}={value:.4g}" for name, value in zip(names, values))
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {epoch}, batch {batch}: {terms}"
        )


def check_finite_weights(model: nn.Module, epoch: int) -> None:
    """Stop when a parameter of ``model`` holds a NaN/inf after ``epoch``, naming the first few."""
    parameters = list(unwrap(model).named_parameters())
    finite = torch.stack([parameter.detach().isfinite().all() for _, parameter in parameters])
    if not bool(finite.all()):
        names = [name for (name, _), ok in zip(parameters, finite.tolist()) if not ok]
        raise NonFiniteLossError(
            f"non-finite weights after epoch {epoch} (training diverged): "
            f"{', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
        )


def check_finite_outputs(
    scores: torch.Tensor, masks: torch.Tensor, source: object, batch: int
) -> None:
    """Stop when an evaluated batch (of the images listed in ``source``) has NaN/inf class
    scores or mask values."""
    if not bool(scores.isfinite().all() & masks.isfinite().all()):
        raise NonFiniteLossError(
            f"non-finite class scores or mask values when evaluating "
            f"{source}, batch {batch} (training diverged)"
        )


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    epoch: int,
    run: RunSettings,
    on_batch: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train for one epoch with ``run``'s method, precision and erasing; returns the epoch's mean
    losses, the other logged values and the training error (%)."""
    model.train()
    method, precision, device = run.method, run.precision, run.device
    names, extras = method.loss_terms, method.logged
    erasing = run.erasing_at(epoch)
    totals = torch.zeros(len(names) + len(extras) + 3, dtype=torch.float64, device=device)
    for batch_index, batch in enumerate(loader):
        seed_i = iteration_seed(run.seed, epoch, batch_index)
        images = precision.to_device(batch["image"], device)
        labels = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        stats = method.train_step(model, images, labels, seed_i, precision, erasing)
        logged = torch.stack([stats[name] for name in names + extras])
        values = logged.tolist()[: len(names)]
        check_finite(values, epoch, batch_index, names)
        precision.step(optimizer)
        errors = misclassified(stats["scores"], labels)
        loss = logged[: len(names)].sum().view(1)
        totals += torch.cat(
            [
                torch.cat([loss, logged]) * labels.numel(),
                errors.view(1),
                torch.ones(1, device=device) * labels.numel(),
            ]
        )
        if on_batch is not None:
            on_batch({"loss": sum(values)})
    check_finite_weights(model, epoch)
    loss, *logged_sums, errors, samples = all_reduce_sum(totals).tolist()
    return {
        "loss": loss / samples,
        **{name: total / samples for name, total in zip(names + extras, logged_sums)},
        "cl_error": error_rate(errors, samples),
    }


class Evaluation(NamedTuple):
    """Result of :func:`evaluate`."""

    summary: dict[str, float]
    records: list[dict]
    sweep: ThresholdSweepMeter
    pxap: PxAPMeter


@torch.no_grad()
def predictions(network: nn.Module, loader: Iterable[dict], run: RunSettings) -> Iterator[dict]:
    """Per-image predictions of ``run``'s method: the localisation at the ground-truth geometry,
    class, losses, and the ground truth (``truth``; ``None`` for an image without a mask).

    The forward pass runs under ``run``'s autocast (unless the method refuses it) and its
    outputs are cast to float32. A loader of batches larger than one (``eval_batch_size``)
    evaluates in batches: images and regions go through the network together, which equals
    image by image up to float rounding.
    """
    method, precision, device = run.method, run.precision, run.device
    geometry = loader.dataset.geometry
    source = getattr(loader.dataset, "csv_path", "the evaluation set")
    batched = (loader.batch_size or 1) > 1
    for batch_index, batch in enumerate(loader):
        images = precision.to_device(batch["image"], device)
        labels = batch["label"].to(device, non_blocking=True)
        with precision.autocast(enabled=method.eval_autocast):
            scores, masks, losses, heads = method.outputs(network, images, labels, batched)
        masks = masks.float()
        check_finite_outputs(scores, masks, source, batch_index)
        losses["loss"] = sum(losses.values())
        confidence, predicted = torch.softmax(scores, dim=1).max(dim=1)
        per_image = {name: value.tolist() for name, value in losses.items()}
        confidence, predicted = confidence.tolist(), predicted.tolist()
        head_classes = {name: value.argmax(dim=1).tolist() for name, value in heads.items()}
        for row, label in enumerate(labels.tolist()):
            index = int(batch["index"][row])
            shape = geometry[index]
            truth = batch["mask"][row]
            yield {
                "index": index,
                "label": label,
                "predicted": predicted[row],
                "probability": confidence[row],
                "head_predicted": {name: values[row] for name, values in head_classes.items()},
                "losses": {name: values[row] for name, values in per_image.items()},
                "mask": restore_mask_geometry(
                    masks[row], shape.padded, shape.upscaled, shape.original, exact=run.exact_crop
                ),
                "truth": None if truth is None else truth.to(device),
            }


def with_crf(stream: Iterable[dict], loader, crf: Callable, workers: int) -> Iterator[dict]:
    """Add ``crf_mask`` (the CRF-refined ``R+``) to each prediction, CRF in worker processes."""
    dataset = loader.dataset
    items = (
        (item, dataset.original_image(item["index"]), item["mask"][0].cpu().numpy())
        for item in stream
    )
    for item, refined in refine_with_crf(crf, items, workers):
        item["crf_mask"] = torch.from_numpy(refined)[None].to(item["mask"].device)
        yield item


def empty_dice_cases(item: dict) -> int:
    """How many of the image's F1+ and F1- are a Dice of two empty sets (0, 1 or 2)."""
    predicted, truth = item["mask"] >= 0.5, item["truth"] >= 0.5
    both_empty = not (predicted.any() or truth.any())
    both_full = bool(predicted.all() and truth.all())
    return int(both_empty) + int(both_full)


def localization(mask: torch.Tensor, truth: torch.Tensor | None, empty: float) -> dict:
    """F1+, F1- and IoU of ``mask >= 0.5`` against ``truth`` (each ``None`` without a ground
    truth); ``empty`` is the Dice and IoU of two empty sets."""
    if truth is None:
        return dict.fromkeys(("f1_pos", "f1_neg", "iou"))
    f1_pos, f1_neg = f1_pos_neg(mask, truth, empty=empty)
    iou = iou_at(mask, truth, empty=empty)
    return {"f1_pos": float(f1_pos), "f1_neg": float(f1_neg), "iou": float(iou)}


def image_row(item: dict, empty: float = 1.0) -> tuple:
    """The per-image numbers that make up a summary (``index`` first, for ordering);
    ``empty`` is the Dice and IoU of two empty sets. An image without a ground truth has
    ``None`` for every localisation number."""
    truth = item["truth"]
    row = {
        **localization(item["mask"], truth, empty),
        "f1_pos_all_ones": None if truth is None else float(all_ones_f1(truth, empty)[0]),
        "mask_area": float((item["mask"] >= 0.5).float().mean()),
        "truth_area": None if truth is None else float((truth >= 0.5).float().mean()),
        "empty_dice": 0 if truth is None else empty_dice_cases(item),
        "correct": item["predicted"] == item["label"],
        "head_correct": {
            name: predicted == item["label"] for name, predicted in item["head_predicted"].items()
        },
        "losses": item["losses"],
    }
    if "crf_mask" in item:
        crf = localization(item["crf_mask"], truth, empty)
        row.update({f"crf_{key}": value for key, value in crf.items()})
    return item["index"], row


def head_errors(correct: list[dict[str, bool]]) -> dict[str, float]:
    """``<head>_cl_error`` (%) of each other head, from the per-image ``head_correct``."""
    names = correct[0] if correct else {}
    return {
        f"{name}_cl_error": error_rate(sum(not row[name] for row in correct), len(correct))
        for name in names
    }


def summarise(rows: Iterable[tuple], count_localized: bool = False) -> dict[str, float]:
    """Per-image means over all processes' rows, summed in image order: the localisation
    metrics, the share (%) of the image that the mask and the ground truth cover
    (``mask_area``, ``truth_area``), the other heads' errors, and the number of F1 values that
    are a Dice of two empty sets (``n_empty_dice``).

    The classification error, the losses and ``mask_area`` are over every image; the
    localisation metrics and ``truth_area`` over the images with a ground truth (NaN when none
    has one); with ``count_localized``, ``n_localized`` is their number."""
    meter, crf_meter = LocalizationMeter(), LocalizationMeter()
    rows = sorted(gather_objects(list(rows)), key=lambda item: item[0])
    for _, row in rows:
        meter.update(
            row["f1_pos"],
            row["f1_neg"],
            row["correct"],
            row["losses"],
            f1_pos_all_ones=row["f1_pos_all_ones"],
            iou=row["iou"],
        )
        if "crf_f1_pos" in row:
            crf_meter.update(
                row["crf_f1_pos"], row["crf_f1_neg"], row["correct"], iou=row["crf_iou"]
            )
    summary = meter.compute()
    summary["n_empty_dice"] = sum(row["empty_dice"] for _, row in rows)
    summary["mask_area"] = 100.0 * sum(row["mask_area"] for _, row in rows) / max(len(rows), 1)
    truth_areas = [row["truth_area"] for _, row in rows if row["truth_area"] is not None]
    summary["truth_area"] = 100.0 * sum(truth_areas) / len(truth_areas) if truth_areas else math.nan
    summary.update(head_errors([row["head_correct"] for _, row in rows]))
    if crf_meter.n_images:
        crf = crf_meter.compute()
        summary.update({f"crf_{key}": crf[key] for key in ("f1_pos", "f1_neg", "iou", "top1_loc")})
    if count_localized:
        summary["n_localized"] = meter.n_localized
    return summary


class KeptRecords:
    """The predictions an evaluation keeps as records, at most ``first + misclassified + worst``
    of them whatever the set's size: the first ``first`` images, the first ``misclassified``
    misclassified images after them, and those of the ``worst`` images of lowest F1+ in the
    whole set (ties: the lower image index; images without a ground truth left out) that are
    not already kept.

    A record is the prediction (tensors on the CPU) with its per-image numbers and ``kept``:
    ``"first"``, ``"misclassified"`` or ``"lowest F1+"``."""

    def __init__(self, first: int = 0, misclassified: int = 0, worst: int = 0) -> None:
        self.limits = (first, misclassified, worst)
        self.first: list[dict] = []
        self.misclassified: list[dict] = []
        self.worst: list[tuple[float, int, dict | None]] = []

    @property
    def records(self) -> list[dict]:
        """The first images, the misclassified ones, then the worst by increasing F1+."""
        worst = [record for _, _, record in self.worst if record is not None]
        return self.first + self.misclassified + worst

    def offer(self, item: dict, row: dict) -> None:
        """Keep the prediction ``item`` (with its :func:`image_row` numbers ``row``) if the
        rule selects it among the images offered so far."""
        first, misclassified, worst = self.limits
        shown = True
        if len(self.first) < first:
            self.first.append(kept_record(item, row, "first"))
        elif not row["correct"] and len(self.misclassified) < misclassified:
            self.misclassified.append(kept_record(item, row, "misclassified"))
        else:
            shown = False
        if not worst or row["f1_pos"] is None:
            return
        rank = (row["f1_pos"], item["index"])
        if len(self.worst) == worst and rank >= self.worst[-1][:2]:
            return
        record = None if shown else kept_record(item, row, "lowest F1+")
        self.worst = sorted([*self.worst, (*rank, record)], key=lambda entry: entry[:2])[:worst]


def kept_record(item: dict, row: dict, kept: str) -> dict:
    """``item`` with its tensors on the CPU, its per-image numbers ``row`` and ``kept``."""
    on_cpu = {key: value.cpu() if torch.is_tensor(value) else value for key, value in item.items()}
    return on_cpu | row | {"kept": kept}


def progress_bar(stream: Iterator[dict], loader: Iterable[dict], label: str) -> Iterator[dict]:
    """``stream`` of per-image predictions behind a progress bar over this process's images."""
    sampler = getattr(loader, "sampler", None)
    total = len(sampler) if sampler is not None else None
    return iter(tqdm(stream, total=total, desc=label, unit="image", leave=False, disable=None))


def evaluate(
    model: nn.Module,
    loader: Iterable[dict],
    run: RunSettings,
    keep: int = 0,
    crf: Callable | None = None,
    crf_workers: int = 0,
    progress: str | None = None,
    on_item: Callable[[dict], None] | None = None,
    keep_misclassified: int = 0,
    keep_worst: int = 0,
) -> Evaluation:
    """Evaluate (no erasing) with ``run``'s method, image by image or in batches of same-size
    images (with per-image mask normalisation: the same results).

    The predicted class is ``argmax`` of the method's class scores (the positive region's for
    min-max) and the localisation is its map (``R+`` for min-max) brought back to the
    ground-truth geometry, thresholded at 0.5 (F1+, F1-, IoU), plus the threshold-free PxAP and
    a threshold sweep. With ``crf`` (e.g. ``tools.CRF``) the CRF-refined mask is scored too
    (``crf_*`` keys). Under ``torch.distributed`` each process evaluates its shard and the
    per-image results are gathered and summed in image order, so the summary equals a
    single-process evaluation. ``records`` holds the predictions of this process that
    :class:`KeptRecords` selects (masks on the CPU): the first ``keep``, then the first
    ``keep_misclassified`` misclassified ones and those of the ``keep_worst`` of lowest F1+
    that are not kept already. ``pxap`` holds the set's counts of map values per bin outside /
    inside the ground truth. ``run.metrics`` sets the empty-set Dice and the PxAP bins.
    ``progress`` labels a progress bar over the images (shown on a terminal only); ``on_item``
    is called with each per-image prediction (e.g. to save its map).

    Images without a mask (where the dataset's masks are optional) count in the classification
    error and the losses only; the localisation metrics, PxAP and the sweep are over the others
    (NaN when there are none), and the summary says how many they are (``n_localized``).
    """
    network = unwrap(model).eval()
    broadcast_buffers(network)
    stream = predictions(network, loader, run)
    if crf is not None:
        stream = with_crf(stream, loader, crf, crf_workers)
    if progress is not None:
        stream = progress_bar(stream, loader, progress)
    if on_item is not None:
        stream = observed(stream, on_item)
    kept = KeptRecords(keep, keep_misclassified, keep_worst)
    return score(stream, run.metrics, kept, loader.dataset.spec.optional_masks)


def observed(stream: Iterable[dict], on_item: Callable[[dict], None]) -> Iterator[dict]:
    """``stream``, calling ``on_item`` with each item before passing it on."""
    for item in stream:
        on_item(item)
        yield item


def score(
    stream: Iterable[dict],
    metrics: MetricSettings,
    kept: KeptRecords | None = None,
    optional_masks: bool = False,
) -> Evaluation:
    """The :class:`Evaluation` of a stream of per-image predictions with their ground truth
    (``truth``, ``None`` for an image without one), as :func:`evaluate` describes it; shards of
    several processes are gathered. ``kept`` selects the records (none by default);
    ``optional_masks`` adds ``n_localized`` to the summary."""
    pxap, sweep = PxAPMeter(metrics.pxap_interval), ThresholdSweepMeter(empty=metrics.empty)
    kept = KeptRecords() if kept is None else kept
    rows = []
    for item in stream:
        rows.append(image_row(item, metrics.empty))
        if item["truth"] is not None:
            pxap.update(item["mask"], item["truth"])
            sweep.update(item["mask"], item["truth"])
        kept.offer(item, rows[-1][1])
    pxap.reduce(all_reduce_sum)
    sweep.reduce(all_reduce_sum)
    summary = summarise(rows, count_localized=optional_masks)
    summary["pxap"] = pxap.compute() if sweep.n_images else math.nan
    return Evaluation(summary, kept.records, sweep, pxap)
