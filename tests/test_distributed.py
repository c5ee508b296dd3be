"""Two Gloo processes on the CPU: gradient averaging, erasing under DDP, sharded evaluation."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import loader
from deepmil import distributed
from deepmil.engine import evaluate, train_one_epoch
from deepmil.methods import Erasing
from deepmil.model import MinMaxEntropyNet
from deepmil.precision import Precision
from deepmil.settings import RunSettings
from helpers import tiny_net, tiny_synthetic_config

WORLD = 2


def batches(count: int = 2, size: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "image": torch.randn(size, 3, 64, 64, generator=generator),
            "label": torch.randint(0, 2, (size,), generator=generator),
        }
        for _ in range(count)
    ]


def shard(batch: dict, rank: int) -> dict:
    half = batch["label"].numel() // WORLD
    part = slice(rank * half, (rank + 1) * half)
    return {"image": batch["image"][part], "label": batch["label"][part]}


def init(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)


def train_worker(rank: int, store: str, out: str, erase: bool, scaled: bool) -> None:
    init(rank, store)
    context = distributed.DistributedContext(rank, WORLD, 0)
    model = distributed.wrap_model(tiny_net(1.0), context, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    local = [shard(batch, rank) for batch in batches()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    run = RunSettings(
        precision=Precision(scaler=scaler), erasing=Erasing(2, 10.0, start_epoch=1 if erase else 2)
    )
    train_one_epoch(model, local, optimizer, epoch=1, run=run)
    if scaled:
        assert scaler.get_scale() == 2.0**10, "no step may be skipped"
    torch.save({k: v for k, v in model.module.state_dict().items()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def reference_training(erase: bool) -> dict:
    """One process: gradients of each half computed separately, then averaged."""
    from deepmil.engine import erasing_step, plain_step

    model = tiny_net(1.0).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for index, batch in enumerate(batches()):
        grads = []
        for rank in range(WORLD):
            optimizer.zero_grad(set_to_none=True)
            part = shard(batch, rank)
            if erase:
                erasing_step(model, part["image"], part["label"], 1 + index, 2, 10.0)
            else:
                plain_step(model, part["image"], part["label"], 1 + index)
            grads.append([p.grad.clone() for p in model.parameters()])
        for parameter, first, second in zip(model.parameters(), *grads):
            parameter.grad = (first + second) / WORLD
        optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("erase, scaled", [(False, False), (True, False), (True, True)])
def test_ranks_agree_and_match_averaged_single_process_gradients(tmp_path, erase, scaled):
    """With a gradient scaler (as for fp16), the scaled gradients are averaged across the
    processes and unscaled at the step: the same weights as without it."""
    mp.spawn(
        train_worker, args=(str(tmp_path / "store"), str(tmp_path), erase, scaled), nprocs=WORLD
    )
    first = torch.load(tmp_path / "rank0.pt", weights_only=True)
    second = torch.load(tmp_path / "rank1.pt", weights_only=True)
    reference = reference_training(erase)
    parameters = dict(tiny_net(1.0).named_parameters())
    for name in parameters:
        assert torch.equal(first[name], second[name]), name
        assert torch.allclose(first[name], reference[name], atol=1e-5, rtol=1e-4), name


def evaluate_worker(rank: int, store: str, config: dict, out: str) -> None:
    init(rank, store)
    dataset = loader.build_dataset(loader.DataConfig.from_config(config), "test", train=False)
    data = loader.make_loader(dataset, 1, 0, shuffle=False, seed=0, rank=rank, world_size=WORLD)
    summary = evaluate(tiny_net(1.0), data, RunSettings()).summary
    torch.save({"summary": summary, "seen": [int(i) for i in data.sampler]}, f"{out}/eval{rank}.pt")
    dist.destroy_process_group()


def test_sharded_evaluation_equals_single_process(tmp_path):
    config = tiny_synthetic_config(tmp_path, n_test=7)
    mp.spawn(evaluate_worker, args=(str(tmp_path / "store"), config, str(tmp_path)), nprocs=WORLD)
    results = [torch.load(tmp_path / f"eval{rank}.pt", weights_only=False) for rank in range(2)]
    dataset = loader.build_dataset(loader.DataConfig.from_config(config), "test", train=False)
    single = evaluate(
        tiny_net(1.0), loader.make_loader(dataset, 1, 0, False, 0), RunSettings()
    ).summary
    assert sorted(results[0]["seen"] + results[1]["seen"]) == list(range(len(dataset)))
    assert results[0]["summary"] == single == results[1]["summary"]


def test_sync_bn_switch(monkeypatch):
    monkeypatch.delenv(distributed.SYNC_BN_ENV, raising=False)
    assert distributed.sync_bn_requested()
    for value, expected in (("True", True), ("False", False), ("yes", False)):
        monkeypatch.setenv(distributed.SYNC_BN_ENV, value)
        assert distributed.sync_bn_requested() is expected
    monkeypatch.setenv(distributed.SYNC_BN_ENV, "True")
    converted = distributed.convert_batchnorm(tiny_net(1.0), torch.device("cuda", 0))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    kept = distributed.convert_batchnorm(tiny_net(1.0), torch.device("cpu"))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in kept.modules())
    monkeypatch.setenv(distributed.SYNC_BN_ENV, "False")
    plain = distributed.convert_batchnorm(tiny_net(1.0), torch.device("cuda", 0))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())


def test_not_distributed_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = distributed.init_distributed(use_cuda=False)
    assert (context.rank, context.world_size, context.is_main, context.enabled) == (
        0,
        1,
        True,
        False,
    )


def test_torchrun_cli_writes_one_folder_loadable_in_one_process(tmp_path):
    import json
    import subprocess
    import sys

    from deepmil.checkpoint import load_model_weights

    repo = Path(__file__).resolve().parents[1]
    args = [
        "--yaml",
        "synthetic-4-erasing.yaml",
        "--cudaid",
        "cpu",
        "--epoch",
        "2",
        "--nbrerase",
        "2",
        "--bsize",
        "2",
        "--kmax",
        "1.0",
        "--kmin",
        "1.0",
        "--set",
        "synthetic.image_size=64",
        "--set",
        "crop_size=[64, 64]",
        "--set",
        "synthetic.n_train=16",
        "--set",
        "synthetic.n_test=6",
        "--set",
        "num_workers=0",
        "--set",
        f"fold_folder={tmp_path / 'folds'}",
        "--data-root",
        str(tmp_path / "data"),
        "--exp-root",
        str(tmp_path / "exps"),
        "--exp-name",
        "ddp",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MYSEED", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train_deepmil.py",
            *args,
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [path.name for path in (tmp_path / "exps").iterdir()] == ["ddp"]
    folder = tmp_path / "exps" / "ddp"
    final = json.loads((folder / "final_metrics.json").read_text())
    assert final["test"]["n_images"] == 6 and final["valid"]["n_images"] == 4
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2
    net = MinMaxEntropyNet("resnet18", 2, modalities=5, kmax=1.0, kmin=1.0)
    load_model_weights(net, folder / "best_model.pt", strict=True)
