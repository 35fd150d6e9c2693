"""Run ``experiment=regularisation`` from scratch and keep what it measured, for README's answer.

Writes ``reports/runs/regularisation.json``: the sweep's wall and CPU time (the preset's budget is
30 minutes on 2 cores, issue 21), and per cell (defense x pooling) what its own ``results.json``
says: clean accuracy, the worst-case robust accuracy at every eps, the minimal-perturbation
quartiles (FMN), the epoch cost against a standard epoch, the weights' sparsity, the verdict and
the checks that failed. Nothing is typed in: README's table and answer are rendered from this file
by tools/readme_figures.py (``regularisation_study``).

How: ``robustcnn run experiment=regularisation`` in a temporary folder with its own MLflow store and
an empty weight cache (every model is trained, as on a fresh machine), then the sweep's
``*/results.json`` are read. Extra arguments are passed to ``robustcnn run`` (e.g.
``model.pooling=max`` for the 7 published-architecture cells); they are recorded.

    python benchmarks/regularisation_study.py [--out PATH] [-- OVERRIDES...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import write_report

#: What a cell keeps from its results.json (the rest is in the run's own files and MLflow).
CELL_KEYS = ("clean_accuracy", "reference_eps", "reference_robust_accuracy", "verdict", "train_seconds")


def children_cpu_seconds() -> float:
    """CPU seconds (user + system) of every finished child process: the sweep and its workers."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cell(results: dict[str, Any]) -> dict[str, Any]:
    """One sweep cell's figures, as its job wrote them."""
    report = results.get("defense_report") or {}
    minimal = results.get("minimal_perturbation") or {}
    return {
        "defense": results.get("defense_label") or results.get("defense"),
        "model": results.get("model_label") or results.get("model"),
        **{key: results.get(key) for key in CELL_KEYS},
        "eps": results.get("eps"),
        "worst_case_robust_accuracy": results.get("worst_case_robust_accuracy"),
        "minimal_perturbation": minimal,
        "epoch_cost_ratio": report.get("epoch_cost_ratio"),
        "defense_report": report,  # the defense's own figures: weight norms and sparsity, pruning
        "failed_checks": [c["name"] for c in results.get("checks") or [] if c.get("status") == "failed"],
        "job_seconds": results.get("job_seconds"),
    }


def run_study(overrides: list[str]) -> dict[str, Any]:
    """The sweep in a private folder, store and cache; its cells and what it cost."""
    with tempfile.TemporaryDirectory(prefix="robustcnn-regularisation-") as tmp:
        root = Path(tmp)
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "ROBUSTCNN_CACHE_DIR": str(root / "cache"),
        }
        command = [sys.executable, "-m", "robustcnn.cli", "run", "experiment=regularisation", *overrides]
        start, cpu = time.perf_counter(), children_cpu_seconds()
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        wall, cpu_used = time.perf_counter() - start, children_cpu_seconds() - cpu
        if done.returncode != 0:
            sys.exit(f"the sweep failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        found = sorted(root.glob("multirun/*/*/*/results.json"), key=lambda p: int(p.parent.name))
        cells = [cell(json.loads(path.read_text())) for path in found]
    return {
        "command": ["robustcnn", "run", "experiment=regularisation", *overrides],
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu_used, 1),
        "budget_seconds": 1800,
        "within_budget": wall <= 1800,
        "cells": cells,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/runs/regularisation.json"))
    parser.add_argument("overrides", nargs="*", help="passed to robustcnn run (after --)")
    args = parser.parse_args()
    results = run_study(list(args.overrides))
    print(json.dumps({k: v for k, v in results.items() if k != "cells"}))
    write_report(args.out, "regularisation_study", results)


if __name__ == "__main__":
    main()
