"""The transfer-protocol ablations: every variant is a valid run, and the study reuses runs."""

import json

import pytest
import torch
import yaml

import tools
from deepmil import compare, study
from deepmil.model import build_model
from deepmil.pooling import get_k

VARIANTS = {
    variant.name: variant for _, variants in study.QUESTIONS.values() for variant in variants
}


def resolved_config(variant, tmp_path):
    """The configuration ``train_deepmil.py`` would run for ``variant``."""
    yaml_name = compare.config_name("transfer", variant.config)
    argv = ["--yaml", yaml_name, "--data-root", str(tmp_path), *study.set_options(variant.changes)]
    config, _ = tools.get_yaml_args(argv)
    return config


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_resolves_to_a_valid_configuration(name, tmp_path):
    variant = VARIANTS[name]
    config = resolved_config(variant, tmp_path)
    shipped = resolved_config(study.Variant("shipped", "", variant.config), tmp_path)
    changed = {key for key in config if config[key] != shipped[key]}
    expected = {change.split("=")[0].split(".")[0] for change in variant.changes}
    assert changed == expected
    assert config["method"] == ("cam" if variant.config == "cam" else "minmax")


@pytest.mark.parametrize(("name", "side", "k"), [("dropout-0", 4, 1), ("320px", 5, 2)])
def test_the_pooling_variants_select_the_stated_number_of_cells(name, side, k, tmp_path):
    config = resolved_config(VARIANTS[name], tmp_path)
    model = build_model(config["model"]).eval()
    with torch.no_grad():
        _, maps = model.classify(torch.zeros(1, 3, *config["crop_size"]))
    assert maps.shape[-2:] == (side, side)
    assert (
        get_k(config["model"]["kmax"], side * side) == k == get_k(config["model"]["kmin"], side**2)
    )


def test_the_variants_of_the_paper_settings_are_the_comparison_runs():
    shipped = [variant for variant in VARIANTS.values() if study.shipped(variant)]
    names = {compare.run_name(variant.name, 0) for variant in shipped}
    trained = {compare.run_name(setting, 0) for setting, _ in compare.TRAINED}
    assert names and names <= trained


def test_only_the_comparison_runs_of_the_study_are_trained_with_the_crf(tmp_path, monkeypatch):
    calls = {}

    def record(setting, yaml_name, seed, root, extra, crf=True):
        calls[setting] = (root, crf)
        return root / setting

    monkeypatch.setattr(compare, "run_setting", record)
    roots = {True: tmp_path / "compare", False: tmp_path / "study"}
    for variant in VARIANTS.values():
        study.train_variant(variant, 0, roots, [])
    assert calls["minmax-no-erasing"] == (roots[True], True)
    assert calls["cam"] == (roots[True], True)
    assert calls["dropout-0"] == (roots[False], False)
    assert calls["cam-320px"] == (roots[False], False)
    assert "--crf" not in compare.train_command("x.yaml", tmp_path / "r", [], False)
    assert "--crf" in compare.train_command("x.yaml", tmp_path / "r", [])


def fake_finished_run(folder, variant, epochs=3):
    """A finished run of ``variant``: config, validation metrics and a per-epoch history."""
    folder.mkdir(parents=True)
    config = {
        "MYSEED": 0,
        "method": "minmax",
        "dataset": "synthetic",
        "nbr_times_erase": 4 if variant.config == "4-erasing" else 0,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    valid = {"cl_error": 2.0, "localizer_cl_error": 1.0, "f1_pos": 70.0, "f1_neg": 85.0}
    (folder / "final_metrics.json").write_text(json.dumps({"valid": valid}))
    history = [
        {
            "epoch": epoch,
            "valid_f1_neg": 80.0 + epoch,
            "valid_mask_area": 30.0,
            "valid_truth_area": 25.0,
        }
        for epoch in range(epochs)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in history))


def test_the_study_reuses_finished_runs_and_writes_its_tables_and_figures(tmp_path, capsys):
    compare_root, study_root = tmp_path / "compare", tmp_path / "study"
    for variant in VARIANTS.values():
        root = compare_root if study.shipped(variant) else study_root
        fake_finished_run(root / compare.run_name(variant.name, 0), variant)
    out = tmp_path / "out"
    argv = ["--exp-root", str(study_root), "--compare-root", str(compare_root), "--out", str(out)]
    assert study.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before, reused") == len(VARIANTS)
    markdown = (out / f"{study.NAME}.md").read_text()
    for title, variants in study.QUESTIONS.values():
        assert f"## {title}" in markdown
        assert all(
            f"| {variant.label} | 0 | 2.00 | 1.00 | 70.00 | 85.00 |" in markdown
            for variant in variants
        )
        assert "valid set" not in markdown
    for question in study.QUESTIONS:
        assert (out / f"{study.NAME}-{question}.png").stat().st_size > 0
