"""Attack speed: native PGD against the gradient floor, torchattacks and ART, in one process.

Writes ``reports/benchmarks/attacks.json``. On lenet5 / mnist5k (the default config's model,
taken from the weight cache or trained once), batch 256:

* ``floor``: k x (forward + gradient w.r.t. the input only), the least any k-step PGD can cost;
* native PGD-k with early stopping off (its overhead over the floor) and on (what it saves on an
  undefended model), torchattacks and ART running the same attack;
* the whole 8-eps ``mnist_linf`` curve of PGD-40 with early stopping, against one full PGD-40 run
  at a single eps;
* on CUDA, bf16 autocast's effect on speed and on robust accuracy;
* FMN (L-inf and L2, 100 steps) against foolbox 3.3.4's ``LInfFMNAttack`` / ``L2FMNAttack`` with
  their defaults on the same images: robust accuracy at every eps of the curve (each run once
  answers every eps), the median minimal norm, and the time ratio (< 1: ours is faster).

Ratios are time ratios (< 1 is faster), measured with the contenders interleaved round by round
(benchmarks/_timing.py): the median of the per-round ratios with min, max and a ``meaningful`` flag.
A benchmark, not a test: figures are recorded, not asserted.

    python benchmarks/attacks.py [--images 512] [--rounds 5] [--threads 1] [--out PATH] [--only fmn ...]

A dry run that leaves the committed figures alone: ``--images 16 --rounds 1 --out /tmp/attacks.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _report import write_report
from _timing import interleaved
from torch import Tensor

import robustcnn.attacks.backends  # noqa: F401  (registers the torchattacks and ART backends)
from robustcnn.attacks import Attack, build_attack
from robustcnn.config import compose
from robustcnn.device import resolve_device, seed_everything
from robustcnn.evaluation import minimal
from robustcnn.jobs.inputs import load_data, to_container
from robustcnn.jobs.trained import obtain_model
from robustcnn.threat import ThreatModel

EPS = 0.3
BATCH = 256
#: What ``--only`` picks from: PGD against the floor and libraries, the eps curve (and bf16), FMN.
SECTIONS = ("pgd", "curve", "fmn")
#: The eps grids the FMN rows report on (mnist_linf's, and an L2 grid up to where lenet5 falls).
FMN_EPS = {"linf": (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4), "l2": (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)}
Sync = Callable[[], None] | None


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
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: a process on the other core disturbs least)"
    )
    parser.add_argument(
        "--load-check",
        action="store_true",
        help="measure twice, idle and beside a busy process, and record how far the ratios move",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/attacks.json"))
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="measure only these sections"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = to_container(compose([]))
    data = load_data(config)
    model = obtain_model(config, data, device, progress=False).model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = data.x_test[: args.images].to(device), data.y_test[: args.images].to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    results = measure(model, x, y, args.rounds, sync, device, args.only)
    if args.load_check:
        with busy_process():
            loaded = measure(model, x, y, args.rounds, sync, device, args.only)
        results = {"idle": results, "beside_a_busy_process": loaded, "agreement": agreement(results, loaded)}
    write_report(
        args.out,
        "attacks",
        results,
        device,
        model="lenet5",
        data="mnist5k",
        images=args.images,
        batch_size=BATCH,
        rounds=args.rounds,
        torch_threads=args.threads,
    )


def measure(
    model: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    rounds: int,
    sync: Sync,
    device: torch.device,
    only: Sequence[str] = SECTIONS,
) -> dict[str, Any]:
    """Each comparison in ``only`` once: PGD-10/40 against the floor and the libraries, the 8-eps
    curve (and bf16 on CUDA), FMN against foolbox's."""
    results: dict[str, Any] = {}
    if "pgd" in only:
        for steps in (10, 40):
            results[f"pgd{steps}_eps{EPS}"] = pgd_row(model, x, y, steps, rounds, sync)
    if "curve" in only:
        results["pgd40_mnist_linf_curve"] = curve_row(model, x, y, rounds, sync)
        if device.type == "cuda":
            results["cuda_bf16_autocast"] = bf16_row(model, x, y, rounds, sync)
    if "fmn" in only:
        for norm in ("linf", "l2"):
            results[f"fmn_{norm}_vs_foolbox"] = fmn_row(model, x, y, norm, rounds, sync)
    return results


@contextlib.contextmanager
def busy_process() -> Iterator[None]:
    """Another process spinning a busy Python loop on one core for the duration (a shared machine)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def agreement(idle: dict[str, Any], loaded: dict[str, Any], tolerance: float = 0.10) -> dict[str, Any]:
    """Each median ratio idle against beside the busy process: relative difference, within ``tolerance``?"""
    found: dict[str, Any] = {}
    for section, row in idle.items():
        for key, value in row.items():
            if isinstance(value, dict) and "median" in value:
                other = loaded[section][key]["median"]
                change = abs(other - value["median"]) / value["median"]
                found[f"{section}.{key}"] = {
                    "idle": value["median"],
                    "loaded": other,
                    "relative_change": round(change, 4),
                    "within": change <= tolerance,
                }
    return {"tolerance": tolerance, "ratios": found, "all_within": all(r["within"] for r in found.values())}


def attack(backend: str, steps: int, early_stop: bool = False, amp: bool = False) -> Attack:
    spec = {"name": "pgd", "backend": backend, "steps": steps, "batch_size": BATCH, "seed": 0, "amp": amp}
    if backend == "native":
        spec["early_stop"] = early_stop
    return build_attack(spec)


def pgd_row(model: torch.nn.Module, x: Tensor, y: Tensor, steps: int, rounds: int, sync: Sync) -> dict:
    """PGD-k through each backend against the gradient floor, interleaved round by round."""
    single = ThreatModel(norm="linf", eps=(EPS,))
    attacks = {
        "native": attack("native", steps),
        "native_early_stop": attack("native", steps, early_stop=True),
        "torchattacks": attack("torchattacks", steps),
        "art": attack("art", steps),
    }
    outcomes: dict[str, float] = {}

    def runner(name: str) -> Callable[[], None]:
        return lambda: outcomes.__setitem__(name, attacks[name].run(model, x, y, single).robust_accuracy()[0])

    seed_everything(0)
    contenders = {"floor": floor_fn(model, x, y, steps), **{name: runner(name) for name in attacks}}
    timings = interleaved(contenders, rounds, sync=sync)
    row: dict[str, object] = {
        f"{name}_images_per_s": round(x.shape[0] / timings.median(name), 2) for name in contenders
    }
    row.update(
        {
            "native_vs_floor": timings.ratio("native", "floor"),
            "native_early_stop_vs_floor": timings.ratio("native_early_stop", "floor"),
            "native_vs_torchattacks": timings.ratio("native", "torchattacks"),
            "native_vs_art": timings.ratio("native", "art"),
            "robust_accuracy": outcomes,
            "timings": timings.summary(),
        }
    )
    for key in ("native_vs_floor", "native_vs_torchattacks", "native_vs_art"):
        print(f"PGD-{steps} {key:24s} {row[key]}", flush=True)
    return row


def curve_row(model: torch.nn.Module, x: Tensor, y: Tensor, rounds: int, sync: Sync) -> dict:
    """The 8-eps mnist_linf curve of PGD-40 with early stop against one full PGD-40 run at eps 0.3."""
    curve = ThreatModel(norm="linf", eps=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4))
    single = ThreatModel(norm="linf", eps=(EPS,))
    early, full = attack("native", 40, early_stop=True), attack("native", 40)
    timings = interleaved(
        {
            "curve": lambda: early.run(model, x, y, curve),
            "single_full": lambda: full.run(model, x, y, single),
        },
        rounds,
        sync=sync,
    )
    row = {"eps": list(curve.eps), "curve_vs_single_full_run": timings.ratio("curve", "single_full")}
    print(f"8-eps curve vs one full PGD-40 run: {row['curve_vs_single_full_run']}", flush=True)
    return {**row, "timings": timings.summary()}


def bf16_row(model: torch.nn.Module, x: Tensor, y: Tensor, rounds: int, sync: Sync) -> dict:
    """On CUDA: bf16 autocast against fp32 for the curve, speed and robust accuracy."""
    curve = ThreatModel(norm="linf", eps=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4))
    fp32, bf16 = attack("native", 40), attack("native", 40, amp=True)
    timings = interleaved(
        {"fp32": lambda: fp32.run(model, x, y, curve), "bf16": lambda: bf16.run(model, x, y, curve)},
        rounds,
        sync=sync,
    )
    return {
        "bf16_vs_fp32": timings.ratio("bf16", "fp32"),
        "fp32_robust_accuracy": fp32.run(model, x, y, curve).robust_accuracy(),
        "bf16_robust_accuracy": bf16.run(model, x, y, curve).robust_accuracy(),
        "timings": timings.summary(),
    }


def foolbox_fmn(model: torch.nn.Module, x: Tensor, y: Tensor, norm: str, eps: Sequence[float]) -> Tensor:
    """foolbox 3.3.4's FMN (its defaults: 100 steps) batch by batch: per eps, is each sample correct?

    A minimization attack runs once; foolbox clips its examples to every eps and reports success.
    """
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
    fmn = foolbox.attacks.LInfFMNAttack() if norm == "linf" else foolbox.attacks.L2FMNAttack()
    parts = []
    for start in range(0, x.shape[0], BATCH):
        xb, yb = x[start : start + BATCH], y[start : start + BATCH]
        _, _, success = fmn(fmodel, xb, yb, epsilons=list(eps))
        parts.append(~success.cpu())
    return torch.cat(parts, dim=1)


def fmn_row(model: torch.nn.Module, x: Tensor, y: Tensor, norm: str, rounds: int, sync: Sync) -> dict:
    """Our FMN against foolbox's on the same images: robust accuracy per eps, minimal norms, time."""
    threat = ThreatModel(norm=norm, eps=FMN_EPS[norm])
    ours = build_attack({"name": "fmn", "steps": 100, "batch_size": BATCH, "seed": 0})
    outcomes: dict[str, Any] = {}

    def run_ours() -> None:
        result = ours.run(model, x, y, threat)
        outcomes["ours"] = result.robust_accuracy()
        outcomes["ours_minimal_perturbation"] = minimal.summary({"fmn": result}, norm)

    def run_foolbox() -> None:
        outcomes["foolbox"] = [float(v) for v in foolbox_fmn(model, x, y, norm, threat.eps).float().mean(1)]

    timings = interleaved({"ours": run_ours, "foolbox": run_foolbox}, rounds, sync=sync)
    gap = [round(a - b, 4) for a, b in zip(outcomes["ours"], outcomes["foolbox"], strict=True)]
    row = {
        "eps": list(threat.eps),
        "robust_accuracy": {"ours": outcomes["ours"], "foolbox": outcomes["foolbox"]},
        "ours_minus_foolbox": gap,
        "max_abs_gap": max(abs(g) for g in gap),
        "ours_minimal_perturbation": outcomes["ours_minimal_perturbation"],
        "ours_vs_foolbox": timings.ratio("ours", "foolbox"),
        "timings": timings.summary(),
    }
    print(f"FMN {norm}: max |ours - foolbox| {row['max_abs_gap']}, time {row['ours_vs_foolbox']}", flush=True)
    return row


if __name__ == "__main__":
    main()
