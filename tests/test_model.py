"""Model, WILDCAT pooling, mask and losses: checked against hand-computed values."""

import math
from urllib.error import URLError

import pytest
import torch

from deepmil import backbone
from deepmil.backbone import load_pretrained_trunk, pretrained_path
from deepmil.losses import localizer_loss, negative_loss, positive_loss
from deepmil.model import MinMaxEntropyNet, build_model
from deepmil.pooling import ClassWisePool, WildcatPool2d, get_k
from deepmil.registry import feature_map_size


def small_net(**kwargs) -> MinMaxEntropyNet:
    torch.manual_seed(0)
    options = dict(num_classes=2, modalities=3, kmax=0.5, kmin=0.5, dropout=0.0)
    options.update(kwargs)
    return MinMaxEntropyNet("resnet18", **options)


@pytest.mark.parametrize(
    "k, n, expected",
    [
        (0.09, 225, 20),
        (0.09, 64, 6),
        (0.09, 425, 38),
        (0.09, 117, 11),
        (1.0, 37, 37),
        (1, 37, 1),
        (3, 2, 2),
        (0, 10, 0),
        (-1, 10, 0),
        (0.5, 5, 2),
        (0.09, 4, 1),
        (7.0, 9, 7),
    ],
)
def test_get_k(k, n, expected):
    assert get_k(k, n) == expected


def test_feature_map_sizes_follow_the_stride_formula():
    assert feature_map_size(480) == 15
    assert feature_map_size(240) == 8
    assert feature_map_size(800) == 25
    assert feature_map_size(544) == 17


def test_class_wise_pool_averages_class_major_channels():
    x = torch.arange(2 * 6 * 1 * 1, dtype=torch.float32).view(2, 6, 1, 1)
    pooled = ClassWisePool(3)(x)
    assert torch.equal(pooled[:, :, 0, 0], torch.tensor([[1.0, 4.0], [7.0, 10.0]]))


def test_wildcat_pooling_is_the_mean_of_the_top_k():
    maps = torch.tensor([[[[9.0, 1.0, 5.0], [3.0, 7.0, 2.0], [8.0, 4.0, 6.0]]]])
    pool = WildcatPool2d(kmax=0.34, kmin=0.34, alpha=0.7, dropout=0.5).eval()
    assert get_k(0.34, 9) == 3
    assert pool(maps).item() == pytest.approx((9 + 8 + 7) / 3)
    corrected = WildcatPool2d(0.34, 0.34, 0.7, 0.0, apply_min_term=True).eval()
    assert corrected(maps).item() == pytest.approx((8 + 0.7 * (1 + 2 + 3) / 3) / 2)


def test_wildcat_dropout_only_in_training_and_unbiased():
    torch.manual_seed(0)
    maps = torch.rand(1, 1, 4, 4)
    pool = WildcatPool2d(kmax=4, kmin=0, alpha=0.0, dropout=0.5)
    expected = torch.topk(maps.flatten(), 4).values.mean()
    assert pool.eval()(maps).item() == pytest.approx(expected.item())
    pool.train()
    draws = torch.stack([pool(maps) for _ in range(4000)])
    assert not torch.allclose(draws, draws[0])
    assert draws.mean().item() == pytest.approx(expected.item(), rel=0.05)


def test_mask_range_and_threshold_equivalence():
    net = small_net().eval()
    continuous = torch.randn(3, 1, 8, 8)
    mask = net.pseudo_binary_mask(continuous)
    low, high = torch.sigmoid(torch.tensor(-4.0)), torch.sigmoid(torch.tensor(4.0))
    assert mask.min().item() == pytest.approx(low.item(), abs=1e-6)
    assert mask.max().item() == pytest.approx(high.item(), abs=1e-6)
    normalised = (continuous - continuous.min()) / (continuous.max() - continuous.min())
    assert torch.equal(mask >= 0.5, normalised >= 0.5)


def test_batch_and_sample_normalisation_differ_as_specified():
    continuous = torch.stack([torch.linspace(0, 1, 16), torch.linspace(0, 3, 16)]).view(2, 1, 4, 4)
    batch_mask = small_net().pseudo_binary_mask(continuous)
    sample_mask = small_net(mask_normalization="sample").pseudo_binary_mask(continuous)
    assert torch.allclose(sample_mask[0], sample_mask[1])
    assert batch_mask[0].max().item() == pytest.approx(
        torch.sigmoid(torch.tensor(8 * (1 / 3 - 0.5))).item(), abs=1e-6
    )
    assert batch_mask[1].max().item() == pytest.approx(
        torch.sigmoid(torch.tensor(4.0)).item(), abs=1e-6
    )


def test_constant_map_gives_a_finite_mask():
    mask = small_net().pseudo_binary_mask(torch.full((2, 1, 4, 4), 3.0))
    assert torch.isfinite(mask).all()


def test_negative_loss_is_log_c_for_uniform_and_larger_otherwise():
    uniform = torch.zeros(4, 5)
    assert negative_loss(uniform).item() == pytest.approx(math.log(5))
    scores = torch.tensor([[2.0, 0.0, -1.0, 0.5, 0.0]])
    expected = -torch.log_softmax(scores, dim=1).mean().item()
    assert negative_loss(scores).item() == pytest.approx(expected)
    assert expected > math.log(5)


def test_positive_and_localizer_losses_are_cross_entropy():
    scores = torch.tensor([[1.0, 2.0], [0.5, -0.5]])
    labels = torch.tensor([1, 0])
    expected = -(torch.log_softmax(scores, 1)[0, 1] + torch.log_softmax(scores, 1)[1, 0]) / 2
    assert positive_loss(scores, labels).item() == pytest.approx(expected.item())
    assert localizer_loss(scores, labels).item() == pytest.approx(expected.item())


def test_forward_shapes_and_classifier_input_size():
    net = small_net().train()
    out = net(torch.randn(2, 3, 96, 64))
    assert out.mask.shape == (2, 1, 96, 64)
    assert out.seg_maps.shape == (2, 2, 3, 2)
    assert out.pos_maps.shape == (2, 2, 2, 1)
    assert not out.mask.requires_grad


def test_positive_map_mixes_class_maps_by_the_posterior():
    net = small_net().eval()
    x = torch.randn(2, 3, 64, 64)
    continuous, scores, maps = net.segment(x)
    posterior = torch.softmax(scores, dim=1)
    mixed = (posterior[:, :, None, None] * maps).sum(dim=1, keepdim=True)
    expected = torch.nn.functional.interpolate(
        mixed, size=(64, 64), mode="bilinear", align_corners=True
    )
    assert torch.allclose(continuous, expected, atol=1e-6)


def test_gradient_flow_between_heads():
    net = small_net().train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    out = net(x)
    (positive_loss(out.pos_scores, y) + negative_loss(out.neg_scores)).backward()
    assert all(p.grad is None or not p.grad.any() for p in net.headseg.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.cl32.parameters())
    net.zero_grad(set_to_none=True)
    out = net(x)
    localizer_loss(out.seg_scores, y).backward()
    assert all(p.grad is None or not p.grad.any() for p in net.cl32.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.headseg.parameters())


@pytest.mark.parametrize(
    "name, classes, parameters, entries",
    [
        ("resnet18", 2, 11_335_252, 144),
        ("resnet50", 2, 23_672_788, 336),
        ("resnet101", 2, 42_664_916, 642),
        ("resnet101", 5, 42_726_386, 642),
        ("resnet101", 102, 44_713_916, 642),
        ("resnet101", 200, 46_721_936, 642),
    ],
)
def test_parameter_counts_match_the_reference(name, classes, parameters, entries):
    with torch.device("meta"):
        net = MinMaxEntropyNet(name, classes, modalities=5)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == parameters
    assert len(net.state_dict()) == entries


def test_state_dict_names_and_strict_reload(tmp_path):
    net = small_net(modalities=5)
    keys = set(net.state_dict())
    for key in [
        "sigma",
        "w",
        "conv1.weight",
        "bn3.running_var",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.weight",
        "layer4.1.bn2.num_batches_tracked",
        "headseg.to_modalities.weight",
        "headseg.to_modalities.bias",
        "cl32.to_modalities.weight",
        "cl32.to_modalities.bias",
    ]:
        assert key in keys
    assert net.state_dict()["sigma"].shape == (1,) and net.state_dict()["w"].shape == (1,)
    assert net.state_dict()["headseg.to_modalities.weight"].shape == (10, 512, 1, 1)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    other = small_net(modalities=5)
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(net.eval()(x).pos_scores, other.eval()(x).pos_scores)


def test_trunk_initialisation_is_he_fan_out_and_heads_keep_default_init():
    torch.manual_seed(0)
    net = MinMaxEntropyNet("resnet50", 2)
    weight = net.layer3[0].conv2.weight
    expected_std = math.sqrt(2.0 / (3 * 3 * 256))
    assert weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert torch.equal(net.layer2[1].bn1.weight, torch.ones(128))
    head = net.headseg.to_modalities
    bound = 1 / math.sqrt(head.in_channels)
    assert head.bias.abs().max().item() <= bound
    assert head.weight.abs().max().item() <= bound


def fake_checkpoint(net: MinMaxEntropyNet) -> dict:
    trunk = {
        key: value.clone() + 1
        for key, value in net.state_dict().items()
        if not key.startswith(("headseg", "cl32"))
        and key not in ("sigma", "w")
        and not key.endswith("num_batches_tracked")
    }
    trunk["fc.weight"] = torch.zeros(1000, 512)
    trunk["fc.bias"] = torch.zeros(1000)
    return trunk


def test_pretrained_weights_load_from_the_cache_and_are_verified(tmp_path):
    net = small_net()
    checkpoint = fake_checkpoint(net)
    path = pretrained_path("resnet18", tmp_path)
    torch.save(checkpoint, path)
    heads_before = net.headseg.to_modalities.weight.clone()
    load_pretrained_trunk(net, tmp_path)
    assert torch.equal(net.layer4[1].conv2.weight, checkpoint["layer4.1.conv2.weight"])
    assert torch.equal(net.headseg.to_modalities.weight, heads_before)
    del checkpoint["layer2.0.bn1.running_mean"]
    checkpoint["extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, path)
    with pytest.raises(RuntimeError, match=r"layer2\.0\.bn1\.running_mean.*extra\.weight"):
        load_pretrained_trunk(small_net(), tmp_path)


def test_offline_pretrained_error_names_url_and_path(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(backbone.torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as error:
        load_pretrained_trunk(small_net(), tmp_path)
    message = str(error.value)
    assert "resnet18-imagenet.pth" in message and "sceneparsing.csail.mit.edu" in message
    assert str(tmp_path / "resnet18-imagenet.pth") in message


def test_build_model_reads_the_model_section():
    config = {
        "name": "resnet18",
        "pretrained": False,
        "num_classes": 3,
        "modalities": 2,
        "kmax": 0.3,
        "kmin": 0.1,
        "alpha": 0.0,
        "dropout": 0.2,
        "sigma": 0.4,
        "w": 6.0,
        "scale": [0.5, 0.5],
        "mask_normalization": "sample",
        "apply_min_term": False,
    }
    net = build_model(config)
    assert net.headseg.to_modalities.out_channels == 6
    assert net.cl32.wildcat.kmax == 0.3 and net.cl32.wildcat.dropout == 0.2
    assert net.sigma.item() == pytest.approx(0.4) and net.w.item() == 6.0
    assert net.mask_normalization == "sample"


def test_torchvision_variant_is_available_by_name():
    net = MinMaxEntropyNet("tv_resnet18", 2, kmax=0.5, kmin=0.5)
    assert net.conv1.kernel_size == (7, 7)
    assert "conv2.weight" not in net.state_dict()
    out = net.eval()(torch.randn(1, 3, 64, 64))
    assert out.mask.shape == (1, 1, 64, 64)


def test_fused_region_passes_equal_separate_ones_and_are_for_evaluation():
    net = small_net()
    images, mask = torch.randn(2, 3, 64, 64), torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        separate = net.eval().classify_regions(images, mask)
        fused = net.classify_regions(images, mask, fused=True)
        for expected, got in zip(separate, fused):
            assert torch.allclose(expected, got, atol=1e-5)
    with pytest.raises(ValueError, match="fused region passes are for evaluation"):
        net.train().classify_regions(images, mask, fused=True)
    with pytest.raises(ValueError, match="unknown mask normalization 'image'"):
        net.pseudo_binary_mask(torch.rand(1, 1, 4, 4), normalization="image")
