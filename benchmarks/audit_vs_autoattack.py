"""Strength and cost of `robustcnn run`'s defaults and of `robustcnn audit` against AutoAttack.

Writes ``reports/benchmarks/audit_vs_autoattack.json``. Adversarially trained lenet5 models of
different robustness (``MODELS``; from the weight cache, or trained once; each records its training
settings): by default ``pgd_at_preset`` (mnist_defenses' pgd_at schedule: 12 epochs at a constant
Adam lr 3e-3, batch 100, no augmentation: the issue's target), ``trades_preset`` (TRADES on the same
schedule: the more robust one) and ``pgd_at_finetune`` (the demo's: two epochs of PGD-10 training
after standard training; much less robust); ``pgd_at_20`` (``defense=pgd_at``,
20 epochs, batch 100: the earlier reference) on request. The images are the first ``--images`` of
mnist5k's test split; eps 0.3 (L-inf). Per model, four evaluations on the same images (imports,
MLflow's and torchattacks' included, are counted once, in ``setup_cpu_seconds``):

* ``pgd40``: a plain PGD-40 (step 0.01, cross-entropy, one random start): the weak reference;
* ``autoattack``: AutoAttack, standard version, as torchattacks implements it (APGD-CE, APGD-T,
  FAB-T, Square): the reference strength;
* ``run_defaults``: the battery of ``robustcnn run`` with its default attack, eval and checks
  sections (conf/config.yaml) at threat eps [0, 0.3] (attacks, noise floor, probes and checks);
* ``audit``: ``robustcnn audit`` with its defaults at the single eps 0.3 on ``--audit-images``
  (default: the same images), wall time of the whole command included.

Targets (issue 18): the run defaults' and the audit's robust accuracy each within 1.0 point of
AutoAttack's, in <= 10% of its CPU time, on every model. A benchmark, not a test: the figures are
recorded, not asserted.

    python benchmarks/audit_vs_autoattack.py [--images 1000] [--audit-images N] [--models A,B]
        [--out PATH] [--skip-autoattack | --only-autoattack | --reuse-autoattack]

AutoAttack dominates the time (~15-20 min per model on 2 cores): ``--reuse-autoattack`` takes a
model's AutoAttack figures from the existing output file when that file was written whole by this
script (its digest matches) on the same weights (sha256 of the tensors), images and eps, and says so
(``reused_from``).

Every figure in the file is measured here: wall and CPU seconds (all threads, ``resource.getrusage``)
and the load average before and after each evaluation, the torch threads, and (benchmarks/_report.py)
the machine, the commit and a digest of the whole file. CPU time is the figure to compare on a busy
machine: waiting for a core is not counted in it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from _provenance import cpu_seconds, verify
from _report import write_report
from safetensors.torch import save_file

from robustcnn.attacks import PGD
from robustcnn.config import compose
from robustcnn.device import resolve_device, seed_everything
from robustcnn.evaluation.battery import BatterySettings, run_battery
from robustcnn.evaluation.settings import plan_attacks
from robustcnn.jobs.audit import run_audit
from robustcnn.jobs.inputs import load_data, to_container
from robustcnn.jobs.trained import obtain_model
from robustcnn.threat import ThreatModel

EPS = 0.3
#: The models compared: a label and the `robustcnn run` overrides that train them.
MODELS: dict[str, dict[str, Any]] = {
    "pgd_at_preset": {
        "label": "lenet5 pgd_at, mnist_defenses' schedule (12 epochs, Adam lr 3e-3 constant, batch 100)",
        "overrides": [
            "defense=pgd_at",
            "training.epochs=12",
            "training.batch_size=100",
            "training.optimizer.lr=0.003",
            "training.scheduler.name=none",
            "training.augment.shift=0",
        ],
    },
    "trades_preset": {
        "label": "lenet5 trades (beta 6), mnist_defenses' schedule (12 epochs, Adam lr 3e-3, batch 100)",
        "overrides": [
            "defense=trades",
            "training.epochs=12",
            "training.batch_size=100",
            "training.optimizer.lr=0.003",
            "training.scheduler.name=none",
            "training.augment.shift=0",
        ],
    },
    "pgd_at_finetune": {
        "label": "lenet5 pgd_at_finetune (the demo's: 8 standard epochs, then 2 of PGD-10 training)",
        "overrides": ["defense=pgd_at_finetune"],
    },
    "pgd_at_20": {
        "label": "lenet5 pgd_at, 20 epochs, batch 100 (training defaults otherwise)",
        "overrides": ["defense=pgd_at", "training.epochs=20", "training.batch_size=100"],
    },
}
#: Measured by default: the issue's mnist_defenses model, the most robust lenet5 we could train on
#: mnist5k's 4,000 training images (trades on the same schedule; pgd_at for 30 epochs was less
#: robust: 82.7% under APGD-100 + FGSM on these images, vs 84.4% for trades and 82.1% for the
#: preset, measured once before this benchmark ran) and a cheap, much less robust one. Each trains
#: in 2-11 minutes on 2 cores; pgd_at_20, the earlier reference, on request.
DEFAULT_MODELS = ("pgd_at_preset", "trades_preset", "pgd_at_finetune")
GAP_TARGET_POINTS = 1.0
TIME_TARGET_FRACTION = 0.10
T = TypeVar("T")


def measured(run: Callable[[], T]) -> tuple[T, dict[str, Any]]:
    """``run()``'s value, and its wall and CPU seconds (all threads) with the load average around it."""
    load_before = [round(v, 2) for v in os.getloadavg()]
    start, cpu = time.perf_counter(), cpu_seconds()
    value = run()
    figures = {
        "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(cpu_seconds() - cpu, 2),
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    return value, figures


def robust_mask(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(x[i : i + batch]).argmax(1) == y[i : i + batch] for i in range(0, len(y), batch)]
        )


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict[str, Any]:
    """AutoAttack (standard, torchattacks): robust accuracy, wall and CPU seconds."""
    import torchattacks

    attack = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)

    def run() -> torch.Tensor:
        adv = torch.cat([attack(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)])
        return robust_mask(model, adv, y)

    robust, figures = measured(run)
    return {"robust_accuracy": float(robust.float().mean()), "batch_size": batch, **figures}


def pgd40(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """A plain PGD-40 (step 0.01, CE, one random start): the weak reference."""
    pgd = PGD(steps=40, step_size=0.01, random_start=True, restarts=1, loss="ce", seed=0, batch_size=500)
    result, figures = measured(lambda: pgd.run(model, x, y, ThreatModel(norm="linf", eps=(EPS,))))
    return {"robust_accuracy": result.robust_accuracy()[0], **figures}


def run_defaults(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The battery ``robustcnn run`` runs by default (its attack, eval and checks sections), eps [0, 0.3]."""
    config = to_container(compose([f"threat.eps=[0.0,{EPS}]", f"threat.reference_eps={EPS}"]))
    threat, attacks = plan_attacks(config)
    assert threat is not None, "conf/config.yaml selects no attack"
    settings = BatterySettings.from_mapping(config["checks"])
    battery, figures = measured(
        lambda: run_battery(model, x, y, threat, attacks, undefended=False, settings=settings)
    )
    return {
        "robust_accuracy": battery.reference_robust_accuracy(),
        **figures,
        "attacks": [a.name for a in attacks],
        "verdict": battery.verdict,
        "per_attack": {k: r.robust_accuracy()[-1] for k, r in battery.attacks.items()},
        "probes": {k: {"n": r.n, "robust_accuracy": r.robust_accuracy()} for k, r in battery.probes.items()},
        "attack_seconds": {k: round(r.seconds, 2) for k, r in {**battery.attacks, **battery.probes}.items()},
        "failed_checks": [c.name for c in battery.checks if c.passed is False],
    }


def reusable_autoattack(out: Path, model: str, header: dict[str, Any]) -> dict[str, Any] | None:
    """AutoAttack's figures for ``model`` from an earlier output of this script on the same weights,
    images and eps."""
    if not out.is_file():
        return None
    previous = json.loads(out.read_text())
    if verify(previous) is not None:
        return None
    earlier = previous.get("results", {}).get("models", {}).get(model, {})
    if "autoattack" not in earlier or any(earlier.get(key) != header[key] for key in header):
        return None
    stamp = previous["written_by"]
    reused_from = {"date": previous.get("date"), "commit": stamp.get("commit"), "sha256": previous["sha256"]}
    return {**earlier["autoattack"], "reused_from": reused_from}


def targets(evaluated: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """An evaluation against AutoAttack: the gap in points and the time fractions, wall and CPU."""
    gap = 100 * (evaluated["robust_accuracy"] - reference["robust_accuracy"])
    wall = evaluated["seconds"] / reference["seconds"]
    cpu = evaluated["cpu_seconds"] / reference["cpu_seconds"]
    return {
        "gap_points": round(gap, 2),
        "gap_target_points": GAP_TARGET_POINTS,
        "gap_met": gap <= GAP_TARGET_POINTS,
        "time_fraction": round(wall, 4),
        "cpu_time_fraction": round(cpu, 4),
        "time_target_fraction": TIME_TARGET_FRACTION,
        # CPU time: the one of the two that a busy machine barely moves
        "time_met": cpu <= TIME_TARGET_FRACTION,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images of AutoAttack, PGD-40, run defaults")
    parser.add_argument(
        "--audit-images", type=int, default=None, help="images of the audit (default: --images, the same)"
    )
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {sorted(MODELS)}"
    )
    parser.add_argument("--batch", type=int, default=250, help="AutoAttack batch size")
    parser.add_argument("--skip-autoattack", action="store_true", help="no AutoAttack (minutes, not ~40)")
    parser.add_argument("--only-autoattack", action="store_true", help="AutoAttack (and PGD-40) only")
    parser.add_argument(
        "--reuse-autoattack", action="store_true", help="AutoAttack figures from --out if same weights/images"
    )
    parser.add_argument(
        "--audit-override", action="append", default=[], help="extra audit override (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/audit_vs_autoattack.json"))
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    return args


def main() -> None:
    args = parse_args()
    device = resolve_device("auto")
    # set-up, not evaluation time: AutoAttack's library and the MLflow the audit logs to
    import mlflow  # noqa: F401
    import torchattacks  # noqa: F401

    results: dict[str, Any] = {
        "images": args.images,
        "eps": EPS,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "setup_cpu_seconds": round(cpu_seconds(), 2),  # imports: before any model
        "models": {},
    }
    for name in args.models.split(","):
        results["models"][name] = compare(name, args, device)
        # written whole after each model, so an interrupted run keeps the models it finished
        write_report(args.out, "audit_vs_autoattack", results, device)
    print(json.dumps(results, indent=2))


def compare(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One model's evaluations and their targets against AutoAttack."""
    spec = MODELS[name]
    config = to_container(compose([*spec["overrides"], "attack=[]"]))
    seed_everything(0)
    data = load_data(config)
    trained, training = measured(lambda: obtain_model(config, data, device, progress=False))
    model = trained.model.eval()
    x, y = data.x_test[: args.images].to(device), data.y_test[: args.images].to(device)
    found: dict[str, Any] = {
        "model": spec["label"],
        "training": {
            "overrides": spec["overrides"],
            "defense": config["defense"],
            "training": config["training"],
            "from_cache": trained.cache_hit,
            **({} if trained.cache_hit else training),
        },
        "weights_key": trained.key,
        # the cache key hashes the training config, not the weights: a retrain elsewhere gives other
        # weights under the same key, so AutoAttack figures are reused only for the same digest
        "weights_sha256": weights_digest(model),
        "images": len(y),
        "eps": EPS,
        "clean_accuracy": float(robust_mask(model, x, y).float().mean()),
    }
    found["pgd40"] = pgd40(model, x, y)
    header = {key: found[key] for key in ("weights_key", "weights_sha256", "images", "eps")}
    reused = reusable_autoattack(args.out, name, header) if args.reuse_autoattack else None
    if not args.only_autoattack:
        found["run_defaults"] = run_defaults(model, x, y)
        audit_images = args.audit_images if args.audit_images is not None else args.images
        found["audit"] = audit_figures(model, audit_images, args.audit_override)
    if reused is not None:
        found["autoattack"] = reused
    elif not args.skip_autoattack:
        found["autoattack"] = autoattack(model, x, y, args.batch)
    if "autoattack" in found:
        found["targets"] = {
            key: targets(found[key], found["autoattack"]) for key in ("run_defaults", "audit") if key in found
        }
    return found


def audit_figures(model: torch.nn.Module, images: int, overrides: list[str]) -> dict[str, Any]:
    """``robustcnn audit`` (defaults, eps 0.3 only) on the model saved as a safetensors file."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "lenet5_pgd_at.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(weights), metadata={"robustcnn.model": "lenet5"})
        command = [
            f"threat.eps=[{EPS}]",
            f"threat.reference_eps={EPS}",
            f"audit.n_samples={images}",
            f"audit.out_dir={tmp}/audit",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            *overrides,
        ]
        here = Path.cwd()
        os.chdir(tmp)  # the sqlite store puts artifacts under ./mlruns: keep them in the temporary folder
        try:
            (code, audit), figures = measured(lambda: run_audit(str(weights), command))
        finally:
            os.chdir(here)
    return {
        "robust_accuracy": audit["reference_robust_accuracy"],
        **figures,
        "images": audit["n_test"],
        "verdict": audit["verdict"],
        "exit_code": code,
        "per_attack": {k: v[0] for k, v in audit["robust_accuracy"].items()},
        "probes": {
            k: {"n": v["n"], "robust_accuracy": v["robust_accuracy"]} for k, v in audit["probes"].items()
        },
        "attack_seconds": {k: round(v["seconds"], 2) for k, v in audit["timing"].items()},
        "failed_checks": [c["name"] for c in audit["checks"] if c["passed"] is False],
        "overrides": overrides,
    }


if __name__ == "__main__":
    main()
