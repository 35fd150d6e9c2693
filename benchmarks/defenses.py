"""Epoch time of adversarial training vs standard training (lenet5 on mnist5k).

Writes ``reports/benchmarks/defenses.json``. PGD-k training costs k input-gradient passes plus one
training pass per batch, so its epoch should take about ``(k + 1)`` standard epochs; the recorded
``overhead_ratio = pgd_k_epoch / ((k + 1) * standard_epoch)`` (target <= 1.1) shows how much the
implementation adds on top of that (attack bookkeeping, projections, the mode switches).
A benchmark, never a timed test: the figures depend on the machine (and, on a shared one, on its
load, which is recorded).

    python benchmarks/defenses.py [--batches 20] [--batch-size 100] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _report import write_report

from robustcnn.data import load_dataset
from robustcnn.defenses.adversarial_training import FastAdversarialTraining, PGDAdversarialTraining, Trades
from robustcnn.defenses.base import Defense
from robustcnn.device import resolve_device, seed_everything, set_threads
from robustcnn.models import build_model
from robustcnn.training.loop import TrainConfig, fit

#: name -> (defense factory, gradient passes per batch relative to one standard training pass)
VARIANTS: dict[str, tuple[Callable[[], Defense | None], int]] = {
    "standard": (lambda: None, 1),
    "pgd_3": (lambda: PGDAdversarialTraining(eps=0.3, steps=3), 4),
    "pgd_10": (lambda: PGDAdversarialTraining(eps=0.3, steps=10), 11),
    "fgsm_at": (lambda: FastAdversarialTraining(eps=0.3), 2),
    "trades_10": (lambda: Trades(eps=0.3, steps=10), 12),
}


def time_epoch(name: str, data: Any, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """One one-epoch fit of a fresh model: loop time, and wall time including epoch-end hooks (guard)."""
    factory, _ = VARIANTS[name]
    info = data.info
    seed_everything(0)
    model = build_model(
        "lenet5", input_shape=info.input_shape, num_classes=info.num_classes, mean=info.mean, std=info.std
    )
    defense = factory()
    hooks = defense.hooks(0, data.x_train.to(device), data.y_train.to(device)) if defense else []
    start = time.perf_counter()
    result = fit(model, data.x_train, data.y_train, config, device, hooks=hooks, progress=False)
    wall = time.perf_counter() - start
    return {"epoch_seconds": result.history[0]["epoch_seconds"], "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="batches per timed epoch (null: all)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--variants", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/defenses.json"))
    args = parser.parse_args()

    set_threads(args.threads)
    device = resolve_device(args.device)
    data = load_dataset("mnist5k")
    config = TrainConfig(
        epochs=1, batch_size=args.batch_size, max_batches=args.batches, scheduler="none", shift=0
    )
    # warm-up (allocator, first kernels) is not counted
    time_epoch("pgd_3", data, TrainConfig(epochs=1, batch_size=args.batch_size, max_batches=2), device)
    names = args.variants or list(VARIANTS)
    if "standard" not in names:
        names = ["standard", *names]
    # rounds interleave the variants, so a burst of load on a shared machine hits all of them alike;
    # each variant keeps its best round
    results: dict[str, dict[str, Any]] = {}
    for round_index in range(args.repeats):
        for name in names:
            figures = time_epoch(name, data, config, device)
            print(f"round {round_index + 1} {name:10s} epoch {figures['epoch_seconds']:8.3f} s", flush=True)
            if name not in results or figures["epoch_seconds"] < results[name]["epoch_seconds"]:
                results[name] = {k: round(v, 4) for k, v in figures.items()}
    standard = results["standard"]["epoch_seconds"]
    for name, figures in results.items():
        passes = VARIANTS[name][1]
        figures["gradient_passes_per_batch"] = passes
        figures["cost_vs_standard"] = round(figures["epoch_seconds"] / standard, 3)
        # epoch / (passes x standard epoch): 1.0 = no overhead beyond the gradient passes themselves
        figures["overhead_ratio"] = round(figures["epoch_seconds"] / (passes * standard), 3)
    write_report(
        args.out,
        "defenses",
        results,
        device,
        model="lenet5",
        data="mnist5k",
        images_per_epoch=min(data.x_train.shape[0], args.batches * args.batch_size),
        batch_size=args.batch_size,
        repeats=args.repeats,
        target="overhead_ratio of pgd_3 and pgd_10 <= 1.1",
    )


if __name__ == "__main__":
    main()
