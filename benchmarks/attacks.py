"""Attack speed: native PGD against the gradient floor, torchattacks and ART, in one process.

Writes ``reports/benchmarks/attacks.json``. On lenet5 / mnist5k (the default config's model,
taken from the weight cache or trained once), batch 256:

* ``floor``: k x (forward + gradient w.r.t. the input only), the least any k-step PGD can cost;
* native PGD-k with early stopping off (its overhead over the floor) and on (what it saves on an
  undefended model), torchattacks and ART running the same attack;
* the whole 8-eps ``mnist_linf`` curve of PGD-40 with early stopping, against one full PGD-40 run
  at a single eps;
* on CUDA, bf16 autocast's effect on speed and on robust accuracy.

Ratios are time ratios (< 1 is faster). A benchmark, not a test: figures are recorded, not asserted.

    python benchmarks/attacks.py [--images 512] [--repeats 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import write_report

import robustcnn.attacks.backends  # noqa: F401  (registers the torchattacks and ART backends)
from robustcnn.attacks import build_attack
from robustcnn.config import compose
from robustcnn.device import resolve_device, seed_everything
from robustcnn.jobs.inputs import load_data, to_container
from robustcnn.jobs.trained import obtain_model
from robustcnn.threat import ThreatModel

EPS = 0.3
BATCH = 256


def best_of(repeats: int, fn: Callable[[], object], device: torch.device) -> float:
    """Fastest of ``repeats`` runs (seconds): the least disturbed by the rest of the machine."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def floor_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> Callable[[], None]:
    """k x (forward + input gradient), batch by batch, nothing else."""

    def run() -> None:
        for start in range(0, x.shape[0], BATCH):
            xb = x[start : start + BATCH].clone().requires_grad_(True)
            yb = y[start : start + BATCH]
            for _ in range(steps):
                loss = F.cross_entropy(model(xb), yb, reduction="sum")
                (grad,) = torch.autograd.grad(loss, xb)
                xb = (xb.detach() + 0.01 * grad.sign()).clamp(0, 1).requires_grad_(True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/attacks.json"))
    args = parser.parse_args()

    device = resolve_device(args.device)
    config = to_container(compose([]))
    data = load_data(config)
    model = obtain_model(config, data, device, progress=False).model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = data.x_test[: args.images].to(device), data.y_test[: args.images].to(device)
    single = ThreatModel(norm="linf", eps=(EPS,))
    curve = ThreatModel(norm="linf", eps=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4))
    results: dict[str, object] = {}

    def attack(backend: str, steps: int, early_stop: bool = False, amp: bool = False):
        spec = {"name": "pgd", "backend": backend, "steps": steps, "batch_size": BATCH, "seed": 0, "amp": amp}
        if backend == "native":
            spec["early_stop"] = early_stop
        return build_attack(spec)

    for steps in (10, 40):
        seed_everything(0)
        floor = best_of(args.repeats, floor_fn(model, x, y, steps), device)
        row: dict[str, float] = {"floor_seconds": floor, "floor_images_per_s": args.images / floor}
        outcomes: dict[str, float] = {}
        for backend, early in (("native", False), ("native", True), ("torchattacks", False), ("art", False)):
            key = f"{backend}_early_stop" if early else backend
            pgd = attack(backend, steps, early)
            holder: dict[str, object] = {}
            seconds = best_of(
                args.repeats if backend != "art" else 1,
                lambda pgd=pgd, holder=holder: holder.update(r=pgd.run(model, x, y, single)),
                device,
            )
            row[f"{key}_seconds"] = seconds
            row[f"{key}_images_per_s"] = args.images / seconds
            outcomes[key] = holder["r"].robust_accuracy()[0]  # type: ignore[attr-defined]
            print(
                f"PGD-{steps} {key:22s} {args.images / seconds:9.1f} img/s  robust acc {outcomes[key]:.3f}",
                flush=True,
            )
        print(f"PGD-{steps} floor                  {args.images / floor:9.1f} img/s", flush=True)
        row["native_vs_floor"] = row["native_seconds"] / floor
        row["native_early_stop_vs_floor"] = row["native_early_stop_seconds"] / floor
        row["native_vs_torchattacks"] = row["native_seconds"] / row["torchattacks_seconds"]
        row["native_vs_art"] = row["native_seconds"] / row["art_seconds"]
        row["robust_accuracy"] = outcomes
        results[f"pgd{steps}_eps{EPS}"] = row

    pgd40 = attack("native", 40, early_stop=True)
    curve_seconds = best_of(args.repeats, lambda: pgd40.run(model, x, y, curve), device)
    full_single = results["pgd40_eps0.3"]["native_seconds"]  # type: ignore[index]
    results["pgd40_mnist_linf_curve"] = {
        "eps": list(curve.eps),
        "seconds": curve_seconds,
        "single_eps_full_run_seconds": full_single,
        "curve_vs_single_full_run": curve_seconds / full_single,
    }
    print(
        f"8-eps curve, PGD-40 with early stop: {curve_seconds:.2f}s = "
        f"{curve_seconds / full_single:.2f} x one full PGD-40 run",
        flush=True,
    )

    if device.type == "cuda":
        fp32, bf16 = attack("native", 40), attack("native", 40, amp=True)
        t32 = best_of(args.repeats, lambda: fp32.run(model, x, y, curve), device)
        t16 = best_of(args.repeats, lambda: bf16.run(model, x, y, curve), device)
        results["cuda_bf16_autocast"] = {
            "fp32_seconds": t32,
            "bf16_seconds": t16,
            "bf16_vs_fp32": t16 / t32,
            "fp32_robust_accuracy": fp32.run(model, x, y, curve).robust_accuracy(),
            "bf16_robust_accuracy": bf16.run(model, x, y, curve).robust_accuracy(),
        }

    write_report(
        args.out,
        "attacks",
        results,
        device,
        model="lenet5",
        data="mnist5k",
        images=args.images,
        batch_size=BATCH,
    )


if __name__ == "__main__":
    main()
