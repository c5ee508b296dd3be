"""Recursive erasing on a scripted localizer whose outputs are fixed by the test."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepmil.engine import erasing_step, plain_step, train_one_epoch
from deepmil.methods import Erasing
from deepmil.model import MinMaxEntropyNet
from deepmil.settings import RunSettings

CONFIDENT = [50.0, -50.0]
WRONG = [-50.0, 50.0]


class ScriptedLocalizer(nn.Module):
    """Returns scripted localizer scores and maps per pass; records what it is given."""

    def __init__(self, scores_per_pass, maps_per_pass):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.scores = [torch.tensor(s) for s in scores_per_pass]
        self.maps = maps_per_pass
        self.segment_inputs = []
        self.region_masks = []

    def pseudo_binary_mask(self, continuous_map):
        return continuous_map

    def forward(self, x, mask=None, mode="full", seed=None):
        if mode == "segment":
            t = len(self.segment_inputs)
            self.segment_inputs.append(x.clone())
            return self.maps[t], self.scores[t] + self.weight, None
        self.region_masks.append(mask.clone())
        scores = torch.zeros(x.shape[0], 2) + self.weight
        return scores, None, scores, None


def pixel_maps(batch, passes, size=4):
    """Pass ``t`` lights pixel ``t`` (row-major) with value 1 for every sample."""
    maps = []
    for t in range(passes):
        m = torch.zeros(batch, 1, size, size)
        m.view(batch, -1)[:, t] = 1.0
        maps.append(m)
    return maps


def run(model, batch=1, u=4, size=4):
    images = torch.ones(batch, 3, size, size)
    labels = torch.zeros(batch, dtype=torch.long)
    return erasing_step(model, images, labels, seed=0, nbr_times_erase=u, sigma_erase=10.0)


def test_trust_decays_and_masks_accumulate_by_maximum():
    model = ScriptedLocalizer([[CONFIDENT]] * 4, pixel_maps(1, 4))
    stats = run(model)
    accumulated = model.region_masks[0].view(-1)
    expected = torch.tensor([1.0, math.exp(-0.1), math.exp(-0.2), math.exp(-0.3)])
    assert torch.allclose(accumulated[:4], expected)
    assert torch.equal(accumulated[4:], torch.zeros(12))
    assert int(stats["erasing_passes"]) == 4
    second = model.segment_inputs[1].view(3, -1)
    assert torch.equal(second[:, 0], torch.zeros(3))
    third = model.segment_inputs[2].view(3, -1)
    assert torch.allclose(third[:, 1], torch.full((3,), 1 - math.exp(-0.1)))
    assert torch.allclose(third[:, 2:], torch.ones(3, 14))


def test_sample_misclassified_at_t1_is_excluded_afterwards():
    scores = [
        [CONFIDENT, CONFIDENT],
        [CONFIDENT, WRONG],
        [CONFIDENT, CONFIDENT],
        [CONFIDENT, CONFIDENT],
    ]
    model = ScriptedLocalizer(scores, pixel_maps(2, 4))
    run(model, batch=2)
    kept, dropped = model.region_masks[0].view(2, -1)
    assert torch.allclose(
        kept[:4], torch.tensor([1.0, math.exp(-0.1), math.exp(-0.2), math.exp(-0.3)])
    )
    assert torch.equal(dropped[:4], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    for t in (2, 3):
        assert torch.equal(model.segment_inputs[t][1], model.segment_inputs[1][1])


def test_loss_worse_than_first_pass_gives_zero_trust_but_keeps_history():
    scores = [[[3.0, 0.0]], [[1.0, 0.0]], [[4.0, 0.0]]]
    model = ScriptedLocalizer(scores, pixel_maps(1, 3))
    run(model, u=3)
    accumulated = model.region_masks[0].view(-1)
    p0 = torch.softmax(torch.tensor([3.0, 0.0]), 0)[0].item()
    p2 = torch.softmax(torch.tensor([4.0, 0.0]), 0)[0].item()
    assert accumulated[:3].tolist() == pytest.approx([p0, 0.0, math.exp(-0.2) * p2], rel=1e-6)
    assert torch.equal(model.segment_inputs[2], model.segment_inputs[1])


def test_loop_stops_when_every_sample_failed_and_regions_use_original_images():
    model = ScriptedLocalizer([[WRONG, WRONG]] * 4, pixel_maps(2, 4))
    stats = run(model, batch=2)
    assert len(model.segment_inputs) == 1
    assert int(stats["erasing_passes"]) == 1
    assert torch.equal(model.region_masks[0], torch.zeros(2, 1, 4, 4))
    # One pass of L_seg = 100 ran: logged as the original does, sum / (u + 1), and as the mean.
    assert stats["loss_seg"].item() == pytest.approx(100 / 5)
    assert stats["loss_seg_pass_mean"].item() == pytest.approx(100)


def test_logged_localizer_loss_sums_the_passes_over_u_plus_one():
    scores = [[[3.0, 0.0]], [[1.0, 0.0]], [[4.0, 0.0]]]
    stats = run(ScriptedLocalizer(scores, pixel_maps(1, 3)), u=3)
    losses = [F.cross_entropy(torch.tensor([s[0]]), torch.tensor([0])).item() for s in scores]
    assert stats["loss_seg"].item() == pytest.approx(sum(losses) / 4)
    assert stats["loss_seg_pass_mean"].item() == pytest.approx(sum(losses) / 3)


def dropout_rng_states(monkeypatch):
    """Record the CPU generator state at every WILDCAT dropout call."""
    states = []
    dropout = F.dropout

    def recording(*args, **kwargs):
        states.append(torch.random.get_rng_state())
        return dropout(*args, **kwargs)

    monkeypatch.setattr(F, "dropout", recording)
    return states


def dropout_net():
    torch.manual_seed(0)
    return MinMaxEntropyNet("resnet18", 2, modalities=2, kmax=0.5, kmin=0.5, dropout=0.5)


def test_every_pass_of_an_erasing_step_draws_the_same_dropout_mask(monkeypatch):
    states = dropout_rng_states(monkeypatch)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    stats = erasing_step(dropout_net(), images, labels, seed=7, nbr_times_erase=3, sigma_erase=10.0)
    torch.manual_seed(7)
    seeded = torch.random.get_rng_state()
    assert len(states) == int(stats["erasing_passes"]) + 2  # localizer passes, then 2 regions
    assert all(torch.equal(state, seeded) for state in states)


def test_a_plain_step_reseeds_once_before_its_forward_pass(monkeypatch):
    states = dropout_rng_states(monkeypatch)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    plain_step(dropout_net(), images, labels, seed=7)
    torch.manual_seed(7)
    assert len(states) == 3 and torch.equal(states[0], torch.random.get_rng_state())
    assert not torch.equal(states[1], states[0]) and not torch.equal(states[2], states[1])


def test_erasing_schedule():
    assert not Erasing(4, 10.0, 1).active(0)
    assert Erasing(4, 10.0, 1).active(1)
    assert not Erasing(0, 10.0, 1).active(5)
    assert RunSettings(erasing=Erasing(4, 10.0, 1)).erasing_at(0) is None


class CountingSGD(torch.optim.SGD):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def test_real_model_one_optimizer_step_per_batch_and_at_most_u_passes():
    torch.manual_seed(0)
    net = MinMaxEntropyNet("resnet18", 2, modalities=2, kmax=0.5, kmin=0.5, dropout=0.0)
    calls = []
    net.headseg.register_forward_hook(lambda *args: calls.append(1))
    optimizer = CountingSGD(net.parameters(), lr=0.01)
    batches = [
        {"image": torch.randn(2, 3, 64, 64), "label": torch.tensor([0, 1])} for _ in range(2)
    ]
    before = [p.clone() for p in net.parameters()]
    stats = train_one_epoch(
        net, batches, optimizer, epoch=1, run=RunSettings(erasing=Erasing(3, 10.0, start_epoch=1))
    )
    assert optimizer.steps == 2
    assert 2 <= len(calls) <= 6
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert math.isfinite(stats["loss"]) and 0 <= stats["cl_error"] <= 100
    assert stats["loss"] == pytest.approx(stats["loss_seg"] + stats["loss_pos"] + stats["loss_neg"])
    assert stats["loss_seg_pass_mean"] >= stats["loss_seg"] * 4 / 3 - 1e-9  # at most 3 passes of 4
