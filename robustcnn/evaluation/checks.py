"""Sanity checks of an evaluation (Carlini et al. 2019; AutoAttack's flags), each pass/fail/skipped.

A robust accuracy is only as good as the attack behind it. These checks look for the signs of a
broken attack or masked gradients; any failure turns the verdict into ``unreliable`` (as a
RobustBench model card would flag it). A check whose attacks did not run is reported as skipped
(``passed: None``), never as passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

VERDICTS = ("robust", "not robust", "unreliable")


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool | None  # None: skipped (its attacks were not run)
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CheckSettings:
    """Tolerances (accuracy fractions); sampling noise on ~1,000 images is about 1-2 points."""

    tolerance: float = 0.02
    zero_tolerance: float = 0.05
    max_zero_gradient_fraction: float = 0.05
    robust_threshold: float = 0.5

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> CheckSettings:
        cfg = dict(cfg or {})
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: float(v) for k, v in cfg.items() if k in known})


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join("nan" if math.isnan(v) else f"{v:.3f}" for v in values) + "]"


def skip(name: str, why: str) -> CheckResult:
    return CheckResult(name, None, f"skipped: {why}")


def monotone_in_eps(curves: Mapping[str, Sequence[float]], worst: Sequence[float], tol: float) -> CheckResult:
    """Robust accuracy never rises as eps grows (per attack and worst case)."""
    bad = []
    for name, curve in {**curves, "worst_case": worst}.items():
        rises = [(i, curve[i + 1] - curve[i]) for i in range(len(curve) - 1) if curve[i + 1] - curve[i] > tol]
        if rises:
            bad.append(f"{name} rises by {max(r for _, r in rises):.3f}")
    if len(worst) < 2:
        return skip("monotone_in_eps", "a single eps")
    return CheckResult("monotone_in_eps", not bad, "; ".join(bad) or f"worst case {_fmt(worst)} never rises")


def reaches_zero(
    name: str, accuracy: float | None, eps: float | None, tol: float, why_skipped: str = ""
) -> CheckResult:
    """At a large enough eps every model must fall to ~0% (else the attack is broken or masked)."""
    if accuracy is None or eps is None:
        return skip(name, why_skipped or "no such run")
    passed = accuracy <= tol
    return CheckResult(name, passed, f"robust accuracy {accuracy:.3f} at eps {eps:g} (must be <= {tol:g})")


def not_above(
    name: str,
    lower: tuple[str, Sequence[float]] | None,
    upper: tuple[str, Sequence[float]] | None,
    eps: Sequence[float],
    tol: float,
    claim: str,
) -> CheckResult:
    """``lower``'s accuracy must not exceed ``upper``'s by more than tol at any eps."""
    if lower is None or upper is None:
        return skip(name, "needs " + claim)
    (lo_name, lo), (up_name, up) = lower, upper
    excess = [
        (e, a - b)
        for e, a, b in zip(eps, lo, up, strict=True)
        if not (math.isnan(a) or math.isnan(b)) and a - b > tol
    ]
    if excess:
        e, gap = max(excess, key=lambda item: item[1])
        return CheckResult(
            name, False, f"{lo_name} accuracy exceeds {up_name} by {gap:.3f} at eps {e:g} ({claim})"
        )
    return CheckResult(name, True, f"{lo_name} {_fmt(lo)} <= {up_name} {_fmt(up)} (+{tol:g})")


def gradient_health(zero_fraction: float | None, nan_fraction: float | None, max_zero: float) -> CheckResult:
    if zero_fraction is None or nan_fraction is None:
        return skip("gradients_nonzero_finite", "the model exposes no gradients (black-box)")
    passed = nan_fraction == 0 and zero_fraction <= max_zero
    return CheckResult(
        "gradients_nonzero_finite",
        passed,
        f"{zero_fraction:.1%} of inputs have an all-zero gradient, {nan_fraction:.1%} a NaN one "
        f"(allowed: <= {max_zero:.0%} zero, no NaN)",
    )


def stochastic_handled(
    stochastic: bool, eot_attacks: Sequence[str], gradient_attacks: Sequence[str]
) -> CheckResult:
    if not stochastic:
        return CheckResult("stochastic_model_eot", True, "deterministic model: two forward passes agree")
    if not gradient_attacks:
        return skip("stochastic_model_eot", "stochastic model but no gradient attack ran")
    passed = bool(eot_attacks)
    return CheckResult(
        "stochastic_model_eot",
        passed,
        f"stochastic model (forward passes differ); EOT attacks run: {list(eot_attacks) or 'none'}",
    )


def within_threat(max_excess: float, out_of_bounds: bool) -> CheckResult:
    passed = max_excess <= 1e-4 and not out_of_bounds
    return CheckResult(
        "perturbations_within_threat_model",
        passed,
        f"largest norm excess over eps {max_excess:.2e}; outside bounds: {out_of_bounds}",
    )


def verdict(checks: Sequence[CheckResult], reference_accuracy: float, threshold: float) -> str:
    """``unreliable`` when any check failed; else robust iff the reference robust accuracy >= threshold."""
    if any(c.passed is False for c in checks):
        return "unreliable"
    return "robust" if reference_accuracy >= threshold else "not robust"
