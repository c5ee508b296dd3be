"""The synthetic source task and the trunk pretrained on it: determinism, disjointness from the
target classes, the CSAIL checkpoint layout, the cache, and refusal of bad cached files."""

import json
import math

import numpy as np
import pytest
import torch

from deepmil import pretrain, synthetic
from deepmil.backbone import load_trunk_weights
from deepmil.config import default_values, merge_sections
from deepmil.errors import WeightsError
from deepmil.model import MinMaxEntropyNet
from deepmil.pretrain import PretrainSpec, ensure_trunk, load_synthetic_trunk, read_trunk
from deepmil.source import (
    SOURCE_CLASSES,
    SOURCE_FAMILIES,
    SOURCE_PERIOD_RANGE,
    SourceSpec,
    render_source_image,
)
from helpers import run_cli, tiny_args

TINY = {"num_classes": 3, "per_class": 4, "image_size": 32, "epochs": 1, "batch_size": 4}


def tiny_spec(**changes) -> PretrainSpec:
    section = merge_sections(default_values()["pretrain"], {**TINY, **changes})
    return PretrainSpec.from_config(section, "resnet18")


def test_source_images_depend_only_on_seed_and_index():
    spec = SourceSpec(num_classes=30, per_class=2, image_size=48, seed=5)
    first, label = render_source_image(spec, 7)
    again, same_label = render_source_image(spec, 7)
    assert np.array_equal(first, again) and label == same_label == 7
    other, _ = render_source_image(SourceSpec(30, 2, 48, seed=6), 7)
    assert not np.array_equal(first, other)
    assert first.shape == (48, 48, 3) and first.dtype == np.uint8
    assert sorted(render_source_image(spec, i)[1] for i in range(60)) == sorted(list(range(30)) * 2)


def test_source_classes_are_disjoint_from_the_target_classes():
    families = set(SOURCE_FAMILIES)
    assert not families & set(synthetic.CLASS_PATTERNS + synthetic.DISTRACTOR_PATTERNS)
    assert len(SOURCE_CLASSES) == len(set(SOURCE_CLASSES)) == 30
    assert SOURCE_PERIOD_RANGE[0] > synthetic.PERIOD_RANGE[1]
    target_angles = {0.0, 45.0, 90.0, 135.0}
    stripe_angles = [22.5]  # plaid's first set and wavy's stripes: pi / 8
    stripe_angles += [22.5 + math.degrees(p) for p in SOURCE_FAMILIES["plaid"]]
    stripe_angles += [math.degrees(a) + s for a in SOURCE_FAMILIES["checks"] for s in (45, -45)]
    assert not {round(angle % 180, 6) for angle in stripe_angles} & target_angles


def test_pretrained_trunk_has_the_csail_layout_and_loads_with_the_key_check(tmp_path):
    spec = tiny_spec()
    path = ensure_trunk(spec, tmp_path, quiet=True)
    state = read_trunk(path)
    assert state["fc.weight"].shape == (3, 512) and "classifier.weight" not in state
    record = json.loads(pretrain.record_path(path).read_text())
    assert record["sha256"] == pretrain.sha256_of(path)
    assert record["spec"] == json.loads(spec.to_json())
    model = MinMaxEntropyNet("resnet18", 2)
    load_trunk_weights(model, state)
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert load_synthetic_trunk(MinMaxEntropyNet("resnet18", 2), spec, tmp_path) == path


def test_the_cache_is_reused_and_rebuilt_when_the_spec_changes(tmp_path, monkeypatch):
    spec = tiny_spec()
    path = ensure_trunk(spec, tmp_path, quiet=True)
    calls = []
    monkeypatch.setattr(pretrain, "build_trunk", lambda *args, **kwargs: calls.append(args))
    assert ensure_trunk(spec, tmp_path) == path and calls == []
    changed = tiny_spec(lr=0.02)
    assert pretrain.trunk_path(changed, tmp_path) != path
    ensure_trunk(changed, tmp_path)
    assert len(calls) == 1


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_is_resolved_for_the_cpu_and_names_the_trunk(native, monkeypatch):
    monkeypatch.setattr(pretrain, "cpu_has_native_bf16", lambda: native)
    automatic = tiny_spec()
    assert default_values()["pretrain"]["amp"] == "auto"
    assert automatic.amp == ("bf16" if native else None)
    assert automatic == tiny_spec(amp="bf16" if native else None)
    assert tiny_spec(amp=None).amp is None and tiny_spec(amp="bf16").amp == "bf16"
    assert pretrain.trunk_path(tiny_spec(amp=None)) != pretrain.trunk_path(tiny_spec(amp="bf16"))


def test_same_spec_gives_the_same_trunk(tmp_path):
    spec = tiny_spec()
    first = read_trunk(ensure_trunk(spec, tmp_path / "a", quiet=True))
    second = read_trunk(ensure_trunk(spec, tmp_path / "b", quiet=True))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_corrupted_or_mismatched_cached_trunks_are_refused(tmp_path):
    spec = tiny_spec()
    path = ensure_trunk(spec, tmp_path, quiet=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match its recorded sha256.*delete"):
        read_trunk(path)
    state = pretrain.checkpoint_state(pretrain.CAMNet("resnet18", 3))
    del state["layer2.0.bn1.weight"]
    torch.save(state, path)
    record = json.loads(pretrain.record_path(path).read_text())
    record["sha256"] = pretrain.sha256_of(path)
    pretrain.record_path(path).write_text(json.dumps(record))
    with pytest.raises(WeightsError, match=r"missing trunk keys \['layer2\.0\.bn1\.weight'\]"):
        load_synthetic_trunk(MinMaxEntropyNet("resnet18", 2), spec, tmp_path)
    path.write_bytes(b"not a checkpoint")
    record["sha256"] = pretrain.sha256_of(path)
    pretrain.record_path(path).write_text(json.dumps(record))
    with pytest.raises(WeightsError, match="cannot be read"):
        read_trunk(path)


def test_synthetic_pretraining_is_for_deep_stem_trunks():
    section = merge_sections(default_values()["pretrain"], TINY)
    with pytest.raises(WeightsError, match="deep-stem"):
        PretrainSpec.from_config(section, "tv_resnet18")


def test_pretrain_then_fine_tune_end_to_end(dataset, tmp_path):
    """A tiny run with ``model.pretrained: synthetic`` pretrains the trunk on first use, records
    its sha256, and a second run reuses the cached file."""
    settings = [f"--set pretrain.{key}={value}" for key, value in TINY.items()]
    extra = ["--set", "model.pretrained=synthetic", "--set", f"model.pretrained_cache={tmp_path}"]
    for item in settings:
        extra += item.split(" ", 1)
    result = run_cli(tiny_args(dataset, "--exp-name", "pretrained", "--epoch", "1", *extra))
    assert result.returncode == 0, result.stderr
    trunks = list(tmp_path.glob("resnet18-synthetic-*.pth"))
    assert len(trunks) == 1
    environment = json.loads((dataset / "exps" / "pretrained" / "environment.json").read_text())
    assert environment["pretrained_trunk"] == {
        "path": str(trunks[0]),
        "sha256": pretrain.sha256_of(trunks[0]),
    }
    modified = trunks[0].stat().st_mtime_ns
    again = run_cli(tiny_args(dataset, "--exp-name", "pretrained-again", "--epoch", "1", *extra))
    assert again.returncode == 0, again.stderr
    assert trunks[0].stat().st_mtime_ns == modified
    first = json.loads((dataset / "exps" / "pretrained" / "final_metrics.json").read_text())
    second = json.loads((dataset / "exps" / "pretrained-again" / "final_metrics.json").read_text())
    assert first == second
