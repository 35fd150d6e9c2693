"""The model card: what a reader needs to trust (or distrust) an audit's numbers, as one JSON object.

RobustBench-style: clean and worst-case robust accuracy per eps, the threat model, which attacks
with which settings, how many images of which data, the library versions, the checks and the
verdict, and the date. It is derived from ``audit.json`` (never measured separately), so the two
cannot disagree.
"""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any

#: Libraries whose versions change what an evaluation finds.
_VERSIONED = (
    "robustcnn",
    "torch",
    "adversarial-robustness-toolbox",
    "torchattacks",
    "onnx",
    "onnxruntime",
    "mlflow",
)


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_card(results: dict[str, Any]) -> dict[str, Any]:
    eps = results.get("eps") or []
    worst = results.get("worst_case_robust_accuracy") or []
    threat = results.get("threat") or {}
    return {
        "schema": "robustcnn.model_card/1",
        "model": results["model"],
        "access": "white-box (gradients)" if results["white_box"] else "black-box (queries only)",
        "dataset": results["data"],
        "n_samples": results["n_attacked"],
        "threat_model": {"norm": threat.get("norm"), "eps": eps, "targeted": threat.get("targeted", False)},
        "clean_accuracy": results["clean_accuracy"],
        "robust_accuracy": {f"{e:g}": a for e, a in zip(eps, worst, strict=False)},
        "reference_eps": results.get("reference_eps"),
        "reference_robust_accuracy": results.get("reference_robust_accuracy"),
        "gate": results.get("gate"),
        "attacks": results.get("attacks", {}),
        "checks": [
            {
                "name": c["name"],
                "passed": c["passed"],
                "status": c.get("status", {True: "passed", False: "failed", None: "skipped"}[c["passed"]]),
                "detail": c["detail"],
            }
            for c in results.get("checks", [])
        ],
        "verdict": results["verdict"],
        # white_box: a gradient attack on the model ran; black_box: the verdict rests on query and
        # transfer attacks only (an upper bound of unknown tightness)
        "evidence": results.get("evidence"),
        "libraries": library_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
