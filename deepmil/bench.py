"""Benchmarks of the training step: ``python -m deepmil.bench [--model resnet18 ...]``.

Prints a table and writes JSON. Each figure is the median over ``--repeats`` timed runs after
``--warmup`` untimed runs; ratios are relative to one plain trunk forward+backward on the same
batch, the unit the method's cost is measured in (theory: about 1.5 without erasing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from deepmil.engine import erasing_step, plain_step
from deepmil.model import MinMaxEntropyNet


def timed(function: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``function`` in seconds."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_training_step(args: argparse.Namespace) -> dict[str, float]:
    """Time trunk fwd+bwd, a plain training step and an erasing training step."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MinMaxEntropyNet(args.model, args.classes, kmax=args.kmax, kmin=args.kmax,
                             dropout=args.dropout).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    def trunk() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.trunk(images).sum().backward()

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        plain_step(model, images, labels, seed=0)
        optimizer.step()

    def erasing() -> None:
        optimizer.zero_grad(set_to_none=True)
        erasing_step(model, images, labels, seed=0, nbr_times_erase=args.erase,
                     sigma_erase=10.0)
        optimizer.step()

    results = {name: timed(function, device, args.warmup, args.repeats)
               for name, function in (("trunk_fwd_bwd_s", trunk), ("step_no_erasing_s", plain),
                                      (f"step_{args.erase}_erasing_s", erasing))}
    results["ratio_no_erasing"] = results["step_no_erasing_s"] / results["trunk_fwd_bwd_s"]
    results[f"ratio_{args.erase}_erasing"] = (results[f"step_{args.erase}_erasing_s"]
                                              / results["trunk_fwd_bwd_s"])
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--kmax", type=float, default=0.5)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--erase", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("exps/bench.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = bench_training_step(args)
    setting = (f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {args.device}, "
               f"{torch.get_num_threads()} threads")
    print(f"training step ({setting})")
    for name, value in results.items():
        print(f"  {name:<24} {value:10.4f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"setting": setting, **results}, indent=2))
    return results


if __name__ == "__main__":
    main()
