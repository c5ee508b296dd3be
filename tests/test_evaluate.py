"""The evaluation loop: metrics from the per-image predictions, CRF in worker processes."""

import pytest
import torch

import crf_params
import deepmil.engine
import loader
from deepmil.engine import evaluate, head_errors, image_row, predictions, summarise
from deepmil.metrics import PxAPMeter, f1_pos_neg, iou_at
from deepmil.model import MinMaxEntropyNet
from deepmil.settings import RunSettings
from helpers import tiny_synthetic_config
from tools import CRF


@pytest.fixture(scope="module")
def test_loader(tmp_path_factory):
    config = tiny_synthetic_config(tmp_path_factory.mktemp("evaluate"))
    dataset = loader.build_dataset(loader.DataConfig.from_config(config), "test", train=False)
    return loader.make_loader(dataset, 1, 0, shuffle=False, seed=0)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return MinMaxEntropyNet("resnet18", 2, modalities=2, kmax=1.0, kmin=1.0).eval()


def test_summary_is_the_mean_of_per_image_values(test_loader, net):
    items = list(predictions(net, test_loader, RunSettings()))
    summary = evaluate(net, test_loader, RunSettings()).summary
    f1 = [f1_pos_neg(item["mask"], item["truth"]) for item in items]
    assert summary["n_images"] == len(items) == 5
    assert summary["f1_pos"] == pytest.approx(100 * sum(float(p) for p, _ in f1) / 5)
    assert summary["f1_neg"] == pytest.approx(100 * sum(float(n) for _, n in f1) / 5)
    assert summary["iou"] == pytest.approx(
        100 * sum(float(iou_at(item["mask"], item["truth"])) for item in items) / 5
    )
    errors = sum(item["predicted"] != item["label"] for item in items)
    assert summary["cl_error"] == pytest.approx(100 * errors / 5)
    pxap = PxAPMeter()
    for item in items:
        pxap.update(item["mask"], item["truth"])
    assert summary["pxap"] == pytest.approx(pxap.compute())
    assert all(item["mask"].shape == item["truth"].shape for item in items)
    for key, name in (("mask_area", "mask"), ("truth_area", "truth")):
        shares = [float((item[name] >= 0.5).float().mean()) for item in items]
        assert summary[key] == pytest.approx(100 * sum(shares) / 5)


def test_the_localizer_error_is_that_of_the_localizer_heads_own_scores(test_loader, net):
    items = list(predictions(net, test_loader, RunSettings()))
    summary = evaluate(net, test_loader, RunSettings()).summary
    localizer_errors = 0
    for batch in test_loader:
        seg_scores = net(batch["image"], mask_normalization="sample").seg_scores
        localizer_errors += int((seg_scores.argmax(dim=1) != batch["label"]).sum())
    assert [item["head_predicted"].keys() for item in items] == [{"localizer"}] * 5
    assert summary["localizer_cl_error"] == pytest.approx(100 * localizer_errors / 5)


def test_head_errors_hand_computed():
    rows = [{"localizer": True}, {"localizer": False}, {"localizer": False}, {"localizer": True}]
    assert head_errors(rows) == {"localizer_cl_error": 50.0}
    assert head_errors([{}, {}]) == {} and head_errors([]) == {}


def test_batched_evaluation_equals_image_by_image(test_loader, net):
    dataset = test_loader.dataset
    single, batched = (
        evaluate(
            net,
            loader.make_loader(dataset, batch, 0, shuffle=False, seed=0),
            RunSettings(),
            keep=len(dataset),
        )
        for batch in (1, 3)
    )
    assert single.summary.keys() == batched.summary.keys()
    for key, value in single.summary.items():
        assert batched.summary[key] == pytest.approx(value, abs=1e-4), key
    for one, many in zip(single.records, batched.records):
        assert one["index"] == many["index"] and one["predicted"] == many["predicted"]
        assert torch.allclose(one["mask"], many["mask"], atol=1e-5)
    images = torch.stack([dataset[i]["image"] for i in range(3)])
    with torch.no_grad():
        batch_wide = net(images).mask
        per_image = net(images, mask_normalization="sample").mask
    assert not torch.allclose(batch_wide, per_image, atol=1e-3)


def test_crf_scores_appear_and_do_not_depend_on_the_worker_count(test_loader, net):
    crf = CRF(crf_params.params_for("synthetic"))
    in_process = evaluate(net, test_loader, RunSettings(), crf=crf, crf_workers=0)
    pooled = evaluate(net, test_loader, RunSettings(), crf=crf, crf_workers=2, keep=2)
    assert in_process.summary == pooled.summary
    for key in ("crf_f1_pos", "crf_f1_neg", "crf_iou"):
        assert 0.0 <= in_process.summary[key] <= 100.0
    plain = evaluate(net, test_loader, RunSettings()).summary
    assert {k: v for k, v in in_process.summary.items() if not k.startswith("crf_")} == plain
    assert len(pooled.records) == 2 and "crf_mask" in pooled.records[0]
    assert pooled.records[0]["crf_mask"].shape == pooled.records[0]["truth"].shape


def test_empty_set_convention_in_the_summary():
    empty, full = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)
    half = torch.zeros(1, 4, 4)
    half[0, :2] = 1
    items = [
        {"index": 0, "mask": empty, "truth": empty},  # F1+ is 0/0
        {"index": 1, "mask": full, "truth": full},  # F1- is 0/0
        {"index": 2, "mask": half, "truth": half},
    ]
    for item in items:
        item.update(predicted=0, label=0, losses={"loss": 0.0}, head_predicted={})
    one, zero = (summarise(image_row(item, empty) for item in items) for empty in (1.0, 0.0))
    assert one["n_empty_dice"] == zero["n_empty_dice"] == 2
    assert one["f1_pos"] == pytest.approx(100.0) and one["f1_neg"] == pytest.approx(100.0)
    assert zero["f1_pos"] == pytest.approx(100 * 2 / 3) and zero["f1_neg"] == pytest.approx(
        100 * 2 / 3
    )
    assert zero["iou"] == pytest.approx(100 * 2 / 3)
    assert one["mask_area"] == one["truth_area"] == pytest.approx(100 * 1.5 / 3)


def test_a_progress_bar_counts_every_image_and_changes_no_metric(test_loader, net, monkeypatch):
    shown, real_bar = [], deepmil.engine.progress_bar

    def counting_bar(stream, loader, label):
        bar = real_bar(stream, loader, label)
        for item in bar:
            shown.append(label)
            yield item

    plain = evaluate(net, test_loader, RunSettings()).summary
    monkeypatch.setattr(deepmil.engine, "progress_bar", counting_bar)
    with_bar = evaluate(net, test_loader, RunSettings(), progress="evaluating test").summary
    assert with_bar == plain
    assert shown == ["evaluating test"] * len(test_loader.dataset)
