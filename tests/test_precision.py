"""Mixed precision (``amp``), the fp16 gradient scaler and channels-last format on the CPU."""

import copy
import logging

import pytest
import torch

import deepmil.precision
import train_deepmil
from deepmil.checkpoint import read_checkpoint
from deepmil.engine import erasing_step, plain_step, predictions, train_one_epoch
from deepmil.geometry import compute_geometry
from deepmil.losses import negative_loss, positive_loss
from deepmil.precision import Precision, check_amp
from deepmil.settings import RunSettings
from helpers import tiny_net
from tools import get_yaml_args

CPU = torch.device("cpu")
# bf16 keeps 8 mantissa bits (relative step 2**-8 = 0.4%). On 128x128 images through an untrained
# ResNet-18 a loss of about log 2 = 0.69 moves by up to 0.015: bound 0.03 (absolute). In a whole
# step the region losses also depend on R+, the batch min-max normalisation of the near-flat maps
# of an untrained network pushed through a steep sigmoid (w = 8), which amplifies the rounding
# (measured up to 0.035): bound 0.06 there, and 0.03 again with a fixed mask. (At 64x64 the
# classifier's layer4 map is 1x1 and train-mode BatchNorm over 4 values amplifies it far more.)
BF16_TOLERANCE = 0.03
BF16_STEP_REGION_TOLERANCE = 0.06


def batch(size: int = 128, count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(count, 3, size, size, generator=generator)
    return images, torch.tensor([0, 1, 0, 1][:count])


def losses(stats: dict) -> torch.Tensor:
    return torch.stack([stats["loss_seg"], stats["loss_pos"], stats["loss_neg"]])


def gradients(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("erase", [False, True])
def test_bf16_step_gives_finite_losses_close_to_fp32(erase):
    images, labels = batch()
    results = {}
    for amp in (None, "bf16"):
        model = tiny_net().train()
        precision = Precision.build(amp, CPU)
        if erase:
            stats = erasing_step(
                model,
                images,
                labels,
                seed=0,
                nbr_times_erase=2,
                sigma_erase=10.0,
                precision=precision,
            )
        else:
            stats = plain_step(model, images, labels, seed=0, precision=precision)
        results[amp] = losses(stats), gradients(model)
    (fp32_losses, _), (bf16_losses, bf16_grads) = results[None], results["bf16"]
    assert bf16_losses.dtype == torch.float32
    assert torch.isfinite(bf16_losses).all() and torch.isfinite(bf16_grads).all()
    assert bf16_losses[0] != fp32_losses[0]  # autocast did run in bf16
    assert abs(bf16_losses[0] - fp32_losses[0]) <= BF16_TOLERANCE
    assert (bf16_losses[1:] - fp32_losses[1:]).abs().max() <= BF16_STEP_REGION_TOLERANCE


def test_bf16_region_losses_and_gradients_with_a_fixed_mask():
    images, labels = batch()
    mask = torch.linspace(0, 1, 128).view(1, 1, 1, 128).expand(4, 1, 128, 128)
    results = {}
    for amp in (None, "bf16"):
        model = tiny_net().train()
        with Precision.build(amp, CPU).autocast():
            pos_scores, _, neg_scores, _ = model(images, mask=mask, mode="regions")
        region_losses = torch.stack(
            [positive_loss(pos_scores.float(), labels), negative_loss(neg_scores.float())]
        )
        region_losses.sum().backward()
        results[amp] = region_losses.detach(), gradients(model)
    (fp32_losses, fp32_grads), (bf16_losses, bf16_grads) = results[None], results["bf16"]
    assert not torch.equal(bf16_losses, fp32_losses)
    assert torch.allclose(bf16_losses, fp32_losses, rtol=0, atol=BF16_TOLERANCE)
    # per-parameter gradients round more (bf16 BatchNorm backward); measured cosine 0.88
    assert torch.nn.functional.cosine_similarity(bf16_grads, fp32_grads, dim=0) > 0.8


def test_fp16_is_refused_on_the_cpu():
    with pytest.raises(ValueError, match="amp = 'fp16' needs a CUDA device"):
        Precision.build("fp16", CPU)
    with pytest.raises(ValueError, match="use amp: bf16 or null"):
        check_amp("fp16", CPU)
    with pytest.raises(ValueError, match="not an allowed value"):
        check_amp("fp8", CPU)
    check_amp("bf16", CPU)
    check_amp(None, CPU)


@pytest.mark.parametrize("native", [False, True])
def test_emulated_bf16_on_the_cpu_is_warned_about(native, monkeypatch, caplog):
    monkeypatch.setattr(deepmil.precision, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="deepmil.precision"):
        Precision.build(None, CPU)
        Precision.build("bf16", torch.device("meta"))
        assert not caplog.records
        Precision.build("bf16", CPU)
    warned = [record.getMessage() for record in caplog.records]
    assert warned == ([] if native else [warned[0]])
    assert native or "use amp: null" in warned[0]


def test_grad_scaler_scales_gradients_and_unscales_the_step():
    images, labels = batch(size=64)
    plain, scaled = tiny_net().train(), tiny_net().train()
    plain_step(plain, images, labels, seed=0)
    plain_step(
        scaled,
        images,
        labels,
        seed=0,
        precision=Precision(scaler=torch.amp.GradScaler("cpu", init_scale=8.0)),
    )
    assert torch.allclose(gradients(scaled), 8.0 * gradients(plain), rtol=1e-4, atol=1e-6)

    data = [{"image": images, "label": labels}] * 2
    trained = {}
    for name, scaler in (("plain", None), ("scaled", torch.amp.GradScaler("cpu", init_scale=8.0))):
        model = tiny_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_one_epoch(
            model, data, optimizer, epoch=0, run=RunSettings(precision=Precision(scaler=scaler))
        )
        trained[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(trained["scaled"], trained["plain"], rtol=1e-4, atol=1e-6)


def test_channels_last_gives_the_same_outputs_in_eval_mode():
    images, _ = batch(size=96, count=2)
    model = tiny_net().eval()
    converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
    moved = Precision(channels_last=True).to_device(images, CPU)
    assert moved.is_contiguous(memory_format=torch.channels_last)
    assert converted.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference, output = model(images), converted(moved)
    for expected, actual in zip(reference, output):
        assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5)


class OneBatch(list):
    """A list of one-image batches with the ``dataset.geometry`` and ``batch_size`` that
    ``predictions`` reads."""

    def __init__(self, batches, geometry):
        super().__init__(batches)
        self.dataset = type("Dataset", (), {"geometry": geometry})()
        self.batch_size = 1


def test_channels_last_and_bf16_in_evaluation_predictions():
    images, labels = batch(size=64, count=1)
    data = OneBatch(
        [
            {
                "image": images,
                "label": labels,
                "index": torch.tensor([0]),
                "mask": [torch.ones(1, 64, 64)],
            }
        ],
        [compute_geometry(64, 64, None)],
    )
    model = tiny_net().eval()
    reference = next(predictions(model, data, RunSettings()))
    converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
    channels_last = next(
        predictions(converted, data, RunSettings(precision=Precision(channels_last=True)))
    )
    bf16 = next(predictions(model, data, RunSettings(precision=Precision.build("bf16", CPU))))
    assert torch.allclose(channels_last["mask"], reference["mask"], atol=1e-5)
    assert channels_last["predicted"] == reference["predicted"]
    assert bf16["mask"].dtype == torch.float32 and torch.isfinite(bf16["mask"]).all()
    assert bf16["losses"]["loss_seg"] == pytest.approx(
        reference["losses"]["loss_seg"], abs=BF16_TOLERANCE
    )


def tiny_config(*extra: str) -> dict:
    config, _ = get_yaml_args(
        [
            "--yaml",
            "synthetic-no-erasing.yaml",
            "--kmax",
            "1.0",
            "--kmin",
            "1.0",
            "--set",
            "synthetic.image_size=64",
            "--set",
            "crop_size=[64, 64]",
            *extra,
        ]
    )
    return config


def test_compile_keeps_the_outputs_and_the_state_dict_keys(monkeypatch):
    backends = []
    compile_module = torch.nn.Module.compile

    def recording_compile(module, **options):
        backends.append(options.get("backend"))
        return compile_module(module, **options)

    monkeypatch.setattr(torch.nn.Module, "compile", recording_compile)
    eager = train_deepmil.build_network(tiny_config(), CPU).eval()
    assert backends == []
    compiled = train_deepmil.build_network(tiny_config("--set", "compile=aot_eager"), CPU).eval()
    assert backends == ["aot_eager"]
    assert list(compiled.state_dict()) == list(eager.state_dict())
    images, _ = batch(64, 2)
    with torch.no_grad():
        for expected, got in zip(eager(images), compiled(images)):
            assert torch.allclose(expected, got, atol=1e-5)


def test_the_checkpoint_keeps_the_gradient_scaler_state(tmp_path):
    network = tiny_net()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    train_deepmil.save_epoch(network, optimizer, 0, {"epoch": 0}, [], tmp_path, scaler)
    state = read_checkpoint(tmp_path / "checkpoint.pt")
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(state["scaler"])
    assert restored.get_scale() == 512.0 and restored.get_growth_interval() == 7
    train_deepmil.save_epoch(network, optimizer, 1, {"epoch": 0}, [], tmp_path)
    assert "scaler" not in read_checkpoint(tmp_path / "checkpoint.pt")
