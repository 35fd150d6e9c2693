"""What one job's ``results.json`` becomes in the tracking store: metrics and tags.

Why one module: a job logs these live, and ``robustcnn sync`` rebuilds them from the files a job
left on disk when the store was unreachable; both go through the functions here, so a synced run
reads exactly like one logged live (the dashboard and resume cannot tell them apart).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MetricRow = tuple[str, float | None, int]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def train_metric_rows(history: Sequence[Mapping[str, Any]]) -> list[MetricRow]:
    """``train/<name>`` per epoch (step = epoch, from 1)."""
    return [
        (f"train/{name}", float(value), epoch)
        for epoch, metrics in enumerate(history, start=1)
        for name, value in metrics.items()
        if name != "epoch" and _is_number(value)
    ]


def summary_metric_rows(results: Mapping[str, Any]) -> list[MetricRow]:
    """Clean accuracy, throughput, train time and the defense's numeric report."""
    rows: list[MetricRow] = [
        (name, results.get(name), 0) for name in ("clean_accuracy", "eval_images_per_s", "train_seconds")
    ]
    report = results.get("defense_report") or {}
    rows += [(f"defense/{k}", float(v), 0) for k, v in report.items() if _is_number(v)]
    return rows


def battery_metric_rows(results: Mapping[str, Any]) -> list[MetricRow]:
    """Curves with the eps index as the step (and the eps value in the name), checks, timing.

    Values an attack did not measure (a reference-only attack's other eps) are ``None`` and are
    skipped when logged. A check that was skipped is -1, passed 1, failed 0; an invariant the attack
    base enforces (``status: enforced``) measured nothing and is not logged.
    """
    if "eps" not in results:
        return []
    eps = list(results["eps"])
    curves: dict[str, list[float | None]] = {
        f"robust_accuracy/{k}": list(v) for k, v in results["robust_accuracy"].items()
    }
    curves.update({f"attack_success_rate/{k}": list(v) for k, v in results["attack_success_rate"].items()})
    curves["worst_case_robust_accuracy"] = list(results["worst_case_robust_accuracy"])
    attacks = list(results["robust_accuracy"])
    rows: list[MetricRow] = [("reference_robust_accuracy", results["reference_robust_accuracy"], 0)]
    rows += [(f"timing/{k}_images_per_s", results["timing"][k]["images_per_s"], 0) for k in attacks]
    rows += [
        (f"check/{c['name']}", -1.0 if c["passed"] is None else float(c["passed"]), 0)
        for c in results["checks"]
        if c.get("status") != "enforced"
    ]
    for name, curve in curves.items():
        rows += [(name, curve[i], i) for i in range(len(eps)) if curve[i] is not None]
        rows += [
            (f"{name}/eps_{value:.4g}", curve[i], 0) for i, value in enumerate(eps) if curve[i] is not None
        ]
    return rows + minimal_perturbation_rows(results)


def minimal_perturbation_rows(results: Mapping[str, Any]) -> list[MetricRow]:
    """``minimal_perturbation/<q1|median|q3|unbroken_fraction>`` when a minimum-norm attack ran.

    A quantile that falls on an unbroken sample is None in results.json and is not logged.
    """
    found = results.get("minimal_perturbation") or {}
    return [
        (f"minimal_perturbation/{key}", float(found[key]), 0)
        for key in ("q1", "median", "q3", "unbroken_fraction")
        if _is_number(found.get(key))
    ]


def attribution_metric_rows(results: Mapping[str, Any]) -> list[MetricRow]:
    """``attribution_stability/<method>`` (clean vs adversarial rank correlation) and their cost
    (``timing/attribution_seconds``).

    A method whose maps were all constant has no correlation (None) and is not logged.
    """
    found = results.get("attributions") or {}
    rows: list[MetricRow] = [
        (f"attribution_stability/{method}", float(value), 0)
        for method, value in (found.get("stability") or {}).items()
        if _is_number(value)
    ]
    if _is_number(found.get("seconds")):
        rows.append(("timing/attribution_seconds", float(found["seconds"]), 0))
    return rows


def audit_summary_rows(results: Mapping[str, Any]) -> list[MetricRow]:
    """An audit's own numbers besides the battery's: clean accuracy, exit code, size, the gate."""
    passed = (results.get("gate") or {}).get("passed")
    rows: list[MetricRow] = [
        ("clean_accuracy", results["clean_accuracy"], 0),
        ("exit_code", float(results["exit_code"]), 0),
        ("parameters", float(results["model"]["parameters"]), 0),
    ]
    return rows + ([("gate_passed", float(passed), 0)] if passed is not None else [])


def result_tags(results: Mapping[str, Any]) -> dict[str, Any]:
    """The tags a finished job adds to its run (what the UI filters on); an audit has no weights."""
    tags: dict[str, Any] = {k: results.get(k) for k in ("cache_hit", "weights_key") if k in results}
    if "verdict" in results:
        tags.update({"verdict": results["verdict"], "stochastic": results["stochastic"]})
        tags["evidence"] = results.get("evidence")
    return tags


#: The face study's scalar results logged as metrics (rates on held-out draws, patch properties).
FACE_METRIC_PREFIXES = (
    "dodging_", "impersonation_", "random_", "clean_", "mean_", "patch_", "mask_", "threshold", "ms_per_step",
    "study_seconds", "job_seconds", "false_accept_rate", "transfer_",
)  # fmt: skip


def face_metric_rows(results: Mapping[str, Any]) -> list[MetricRow]:
    """A face study's numbers: every top-level scalar rate/distance/size, the verification error rates,
    and per patch the share of the recognizer's saliency inside it."""
    rows: list[MetricRow] = [
        (name, float(value), 0)
        for name, value in results.items()
        if _is_number(value) and name.startswith(FACE_METRIC_PREFIXES)
    ]
    verification = results.get("verification") or {}
    for which in ("calibrated", "published"):
        for key, value in (verification.get(which) or {}).items():
            if _is_number(value):
                rows.append((f"verification/{which}_{key}", float(value), 0))
    # per patch (the step is its number in results.json's patches): how much of the recognizer's
    # saliency the patch holds, on the clean and on the patched face
    for step, patch in enumerate(results.get("patches") or []):
        saliency = patch.get("saliency") if isinstance(patch, Mapping) else None
        for face in ("clean", "patched"):
            share: Any = (saliency or {}).get(f"{face}_mass_in_patch")
            if _is_number(share):
                rows.append((f"saliency_in_patch/{face}", float(share), step))
    return rows


def all_metric_rows(results: Mapping[str, Any]) -> list[MetricRow]:
    """Every metric of a finished job or audit, rebuilt from its results (what ``sync`` logs)."""
    if results.get("task") == "face_patch":
        return face_metric_rows(results)
    if results.get("task") == "audit":
        return audit_summary_rows(results) + battery_metric_rows(results)
    return (
        train_metric_rows(results.get("train_history") or [])
        + summary_metric_rows(results)
        + battery_metric_rows(results)
        + attribution_metric_rows(results)
    )
