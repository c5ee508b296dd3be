"""Baselines: CAM / WILDCAT / Grad-CAM / all-ones maps, training step and evaluation."""

import cv2
import numpy as np
import pytest
import torch

import loader
from deepmil.backbone import load_trunk_weights
from deepmil.baselines import CAMNet, WildcatNet, class_map_mask, grad_cam
from deepmil.engine import classifier_step, evaluate, train_one_epoch
from deepmil.methods import METHODS, get_method
from deepmil.model import MinMaxEntropyNet, minmax_normalise
from deepmil.registry import METHOD_NAMES
from deepmil.settings import RunSettings
from helpers import tiny_synthetic_config

MODEL_CONFIG = {
    "name": "resnet18",
    "num_classes": 3,
    "modalities": 2,
    "kmax": 1.0,
    "kmin": 1.0,
    "alpha": 0.0,
    "dropout": 0.0,
    "sigma": 0.5,
    "w": 8.0,
    "scale": [0.5, 0.5],
    "pretrained": False,
    "apply_min_term": False,
    "mask_normalization": "batch",
}


def cam_net() -> CAMNet:
    torch.manual_seed(0)
    return CAMNet("resnet18", 3)


def hand_set_cam_net(features: torch.Tensor) -> CAMNet:
    """A CAMNet whose trunk returns ``features`` (2 channels) and whose layer is set by hand."""
    network = CAMNet("resnet18", 2)
    network.classifier = torch.nn.Linear(2, 2)
    with torch.no_grad():
        network.classifier.weight.copy_(torch.tensor([[2.0, -1.0], [0.5, 3.0]]))
        network.classifier.bias.copy_(torch.tensor([0.25, -0.5]))
    network.trunk = lambda x: features
    return network


def test_cam_map_is_the_weighted_sum_of_feature_maps():
    features = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]], [[3.0, 0.0], [1.0, 2.0]]]])
    out = hand_set_cam_net(features)(torch.zeros(1, 3, 64, 64))
    expected_class0 = torch.tensor([[2 * 1 - 3, 2 * 2 - 0], [2 * 0 - 1, 2 * 4 - 2]])
    expected_class1 = torch.tensor([[0.5 + 9, 1.0 + 0], [0 + 3, 2.0 + 6]])
    assert torch.allclose(out.maps[0, 0], expected_class0.float())
    assert torch.allclose(out.maps[0, 1], expected_class1.float())
    means = torch.tensor([7 / 4, 6 / 4])
    expected_scores = torch.tensor(
        [2 * means[0] - means[1] + 0.25, 0.5 * means[0] + 3 * means[1] - 0.5]
    )
    assert torch.allclose(out.scores[0], expected_scores)


def test_class_map_mask_picks_the_class_and_normalises_each_image():
    maps = torch.zeros(2, 2, 2, 2)
    maps[0, 1] = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    maps[1, 0] = torch.tensor([[-4.0, -2.0], [-2.0, 0.0]])
    mask = class_map_mask(maps, torch.tensor([1, 0]), (2, 2))
    assert torch.allclose(mask[0, 0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    assert torch.allclose(mask[1, 0], torch.tensor([[0.0, 0.5], [0.5, 1.0]]))
    upsampled = class_map_mask(maps, torch.tensor([1, 0]), (3, 3))
    assert torch.allclose(upsampled[0, 0, 1, 1], torch.tensor(0.5))
    assert torch.equal(
        minmax_normalise(torch.full((1, 1, 2, 2), 5.0), per_sample=True), torch.zeros(1, 1, 2, 2)
    )


def test_grad_cam_of_a_gap_linear_classifier_is_the_rectified_cam():
    network = cam_net().eval()
    images = torch.randn(2, 3, 64, 64)
    classes = torch.tensor([0, 2])
    scores, masks = grad_cam(network, images, classes)
    assert masks.shape == (2, 1, 64, 64)
    assert all(parameter.grad is None for parameter in network.parameters())
    assert not network.layer4[-1]._forward_hooks
    with torch.no_grad():
        maps = network(images).maps
        assert torch.equal(scores, network(images).scores)
    for row, label in enumerate(classes):
        cam = maps[row, label].clamp_min(0).numpy()
        shifted = cam - cam.min()
        expected = cv2.resize((shifted / (1e-7 + shifted.max())).astype(np.float32), (64, 64))
        assert np.allclose(masks[row, 0].numpy(), expected, atol=1e-4)


def test_grad_cam_localises_the_predicted_class_by_default():
    network = cam_net().eval()
    images = torch.randn(3, 3, 64, 64)
    scores, masks = grad_cam(network, images)
    _, expected = grad_cam(network, images, scores.argmax(dim=1))
    assert torch.equal(masks, expected)
    _, other = grad_cam(network, images, (scores.argmax(dim=1) + 1) % 3)
    assert not torch.equal(masks, other)


@pytest.mark.parametrize(
    "method, network_type",
    [
        ("cam", CAMNet),
        ("wildcat", WildcatNet),
        ("gradcam", CAMNet),
        ("allones", CAMNet),
        ("minmax", MinMaxEntropyNet),
    ],
)
def test_each_method_builds_its_network(method, network_type):
    assert type(get_method(method).build(MODEL_CONFIG)) is network_type


def test_every_registered_method_is_implemented():
    assert tuple(METHODS) == METHOD_NAMES


@pytest.mark.parametrize("method", ["cam", "wildcat", "gradcam", "allones"])
def test_baseline_maps_have_the_input_geometry_and_range(method):
    torch.manual_seed(0)
    network = get_method(method).build(MODEL_CONFIG).eval()
    images = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        scores, mask = get_method(method).localize(network, images)
        assert torch.equal(scores, network(images).scores)
    assert mask.shape == (2, 1, 96, 64)
    if method == "allones":
        assert torch.equal(mask, torch.ones_like(mask))
    else:
        flat = mask.flatten(1)
        assert torch.allclose(flat.min(dim=1).values, torch.zeros(2), atol=1e-6)
        assert torch.allclose(flat.max(dim=1).values, torch.ones(2), atol=1e-4)


@pytest.mark.parametrize("method", ["cam", "wildcat"])
def test_classifier_step_trains_the_baseline(method):
    torch.manual_seed(0)
    network = get_method(method).build(MODEL_CONFIG).train()
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    before = [parameter.detach().clone() for parameter in network.parameters()]
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    stats = classifier_step(network, images, labels, seed=3)
    expected = torch.nn.functional.cross_entropy(stats["scores"], labels)
    assert torch.allclose(stats["loss_cl"], expected)
    optimizer.step()
    changed = [not torch.equal(old, new) for old, new in zip(before, network.parameters())]
    assert all(changed)


def test_baselines_load_imagenet_trunk_weights_without_their_heads():
    source = MinMaxEntropyNet("resnet18", 2).state_dict()
    trunk_only = {
        key: value
        for key, value in source.items()
        if not key.startswith(("headseg.", "cl32.")) and key not in ("sigma", "w")
    }
    trunk_only["fc.weight"] = torch.zeros(1000, 512)
    for network in (CAMNet("resnet18", 3), get_method("wildcat").build(MODEL_CONFIG)):
        load_trunk_weights(network, trunk_only)
        assert torch.equal(network.conv1.weight, source["conv1.weight"])


@pytest.fixture(scope="module")
def synthetic_loaders(tmp_path_factory):
    config = tiny_synthetic_config(tmp_path_factory.mktemp("baselines"), n_test=4)
    train_set = loader.build_dataset(loader.DataConfig.from_config(config), "train", train=True)
    test_set = loader.build_dataset(loader.DataConfig.from_config(config), "test", train=False)
    return (
        loader.make_loader(train_set, 4, 0, shuffle=True, seed=0),
        loader.make_loader(test_set, 1, 0, shuffle=False, seed=0),
    )


@pytest.mark.parametrize("method", ["cam", "wildcat", "gradcam", "allones"])
def test_baselines_train_an_epoch_and_evaluate(method, synthetic_loaders):
    train_loader, test_loader = synthetic_loaders
    torch.manual_seed(0)
    network = get_method(method).build({**MODEL_CONFIG, "num_classes": 2})
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
    run = RunSettings(method=get_method(method))
    stats = train_one_epoch(network, train_loader, optimizer, 0, run)
    assert set(stats) == {"loss", "loss_cl", "cl_error"}
    assert stats["loss"] == pytest.approx(stats["loss_cl"])
    evaluation = evaluate(network, test_loader, run, keep=4)
    assert evaluation.summary["n_images"] == 4
    assert evaluation.summary["loss"] == pytest.approx(evaluation.summary["loss_cl"])
    errors = sum(record["predicted"] != record["label"] for record in evaluation.records)
    assert evaluation.summary["cl_error"] == pytest.approx(100 * errors / 4)
    for record in evaluation.records:
        assert record["mask"].shape == record["truth"].shape
        assert 0 <= record["mask"].min() and record["mask"].max() <= 1
    if method == "allones":
        assert evaluation.summary["f1_pos"] == pytest.approx(evaluation.summary["f1_pos_all_ones"])
        assert evaluation.summary["f1_neg"] == 0.0
