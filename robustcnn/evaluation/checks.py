"""Sanity checks of an evaluation (Carlini et al. 2019; AutoAttack's flags), and the invariants enforced.

A robust accuracy is only as good as the attack behind it. These checks look for the signs of a
broken attack or masked gradients; any failure turns the verdict into ``unreliable`` (as a
RobustBench model card would flag it). Each check is computed from evidence that the thing it
validates did not produce (monotonicity from attacks run on their own at every eps, the threat model
from the reported images themselves), so each one can fail. A check whose attacks did not run is
reported as skipped (``passed: None``), never as passed. What the attack base guarantees by
construction, and nothing could break, is listed as ``enforced``: not a pass, and no evidence for a
verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: ``unchecked``: the checks were turned off (``checks.enabled=false``), so no verdict can be given.
VERDICTS = ("robust", "not robust", "unreliable", "unchecked")

#: What a verdict rests on: a white-box gradient attack on the model itself, or only black-box ones
#: (noise, Square, transfer), whose robust accuracy is an upper bound of unknown tightness.
EVIDENCE = ("white_box", "black_box")

#: A check's outcome as results.json spells it.
STATUSES = ("passed", "failed", "skipped", "enforced")


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool | None  # None: skipped (its attacks were not run), or enforced (see ``enforced``)
    detail: str
    #: Guaranteed by the attack base by construction: nothing was measured, nothing could fail.
    enforced: bool = False

    @property
    def status(self) -> str:
        """passed / failed / skipped / enforced (``passed`` alone cannot tell the last two apart)."""
        if self.enforced:
            return "enforced"
        return {True: "passed", False: "failed", None: "skipped"}[self.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "status": self.status, "detail": self.detail}


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


def enforced(name: str, why: str) -> CheckResult:
    """An invariant the attack base guarantees by construction: listed, never counted as a pass."""
    return CheckResult(name, None, f"enforced: {why}", enforced=True)


def monotone_in_eps(curves: Mapping[str, Sequence[float]], tol: float, why_skipped: str) -> CheckResult:
    """Robust accuracy never rises as eps grows, in curves whose eps were attacked independently.

    Why independent: the base keeps a sample's first success at every larger eps, so the reported
    curves of an untargeted threat are monotone whatever the attack does; only an attack run on its
    own at each eps (the per-eps probe) can show one weaker at a larger eps (Carlini et al.).
    """
    if not curves:
        return skip("monotone_in_eps", why_skipped)
    if all(len(curve) < 2 for curve in curves.values()):
        return skip("monotone_in_eps", "a single eps")
    bad = []
    for name, curve in curves.items():
        rises = [curve[i + 1] - curve[i] for i in range(len(curve) - 1) if curve[i + 1] - curve[i] > tol]
        if rises:
            bad.append(f"{name} rises by {max(rises):.3f} (allowed: {tol:.3f})")
    shown = "; ".join(f"{name} {_fmt(curve)}" for name, curve in curves.items())
    return CheckResult("monotone_in_eps", not bad, "; ".join(bad) or f"never rises: {shown}")


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
    stochastic: bool,
    gradient_attacks: Sequence[str],
    eot_attacks: Sequence[str],
    eot_pairs: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    eps: Sequence[float],
    tol: float,
) -> CheckResult:
    """A randomised model is attacked with EOT, and the EOT attack is at least as strong as one draw.

    ``gradient_attacks``: the white-box gradient attacks that ran; ``eot_attacks``: those of them
    that average their gradient over more than one draw; ``eot_pairs``: per EOT attack, (its curve,
    the curve of the same attack with one draw). Why the comparison: the battery adds the EOT
    variants itself, so their presence proves little; an EOT attack that does worse than a single
    draw averages gradients wrongly (or over too few draws).
    """
    name = "stochastic_model_eot"
    if not gradient_attacks:
        return skip(name, "no white-box gradient attack ran (EOT concerns gradients)")
    if not stochastic:
        return CheckResult(name, True, "deterministic model: two forward passes agree, one draw is exact")
    if not eot_attacks:
        return CheckResult(
            name,
            False,
            f"stochastic model but none of {list(gradient_attacks)} averages its gradient over more "
            "than one draw (checks.eot_samples / attack.eot_samples)",
        )
    if not eot_pairs:
        return skip(name, "stochastic model: no single-draw attack to compare the EOT attacks with")
    results = [
        not_above(name, (eot, curves[0]), (eot.removeprefix("eot_"), curves[1]), eps, tol, "EOT and one draw")
        for eot, curves in eot_pairs.items()
    ]
    failed = [r for r in results if r.passed is False]
    if failed:
        return CheckResult(name, False, "stochastic model: " + "; ".join(r.detail for r in failed))
    return CheckResult(name, True, "stochastic model: " + "; ".join(r.detail for r in results))


class ThreatWitness:
    """Re-measures every adversarial example an attack reports, from the images themselves.

    Why not the recorded norms: the base computes those itself after projecting (they cannot
    disagree with it); this sees every reported image of every sample at every eps (not only the
    few kept for the report) and measures its norm and bounds with its own arithmetic.
    """

    def __init__(self, norm: str, bounds: tuple[float, float]) -> None:
        self.norm, self.bounds = norm, bounds
        self.images = 0
        self.largest_excess = 0.0  # over eps, relative to max(1, eps)
        self.outside_bounds = 0

    def __call__(self, x: Tensor, adv: Tensor, eps: float) -> None:
        delta = (adv.detach().double() - x.detach().double()).flatten(1)
        norms = delta.abs().amax(1) if self.norm == "linf" else delta.pow(2).sum(1).sqrt()
        if norms.numel():
            excess = float((norms - eps).max()) / max(1.0, eps)
            self.largest_excess = max(self.largest_excess, excess)
        low, high = self.bounds
        outside = (adv < low - 1e-6) | (adv > high + 1e-6) | ~torch.isfinite(adv)
        self.outside_bounds += int(outside.flatten(1).any(1).sum())
        self.images += int(adv.shape[0])


def within_threat(
    witnesses: Mapping[str, ThreatWitness], expected: Mapping[str, int], max_excess: float = 1e-4
) -> CheckResult:
    """Every reported example of every attack lies in its eps ball and in the model's bounds.

    ``expected``: per attack, how many examples it reported (samples x eps). An attack whose
    examples were not all shown to its witness (one that bypassed the attack base) fails: what was
    not re-measured cannot count as inside the threat model.
    """
    name = "perturbations_within_threat_model"
    if not expected:
        return skip(name, "no adversarial example was reported")
    bad = []
    for attack, count in expected.items():
        w = witnesses.get(attack)
        if w is None or w.images < count:
            bad.append(f"{attack}: only {w.images if w else 0:,} of its {count:,} examples re-measured")
        elif w.largest_excess > max_excess or w.outside_bounds:
            bad.append(
                f"{attack}: norm exceeds eps by {w.largest_excess:.2e}, {w.outside_bounds} images "
                f"outside {list(w.bounds)}"
            )
    seen = [w for k, w in witnesses.items() if k in expected]
    images = sum(w.images for w in seen)
    summary = f"{images:,} reported examples of {len(expected)} attacks re-measured"
    if bad:
        return CheckResult(name, False, f"{summary}; " + "; ".join(bad))
    largest = max(w.largest_excess for w in seen)
    return CheckResult(
        name, True, f"{summary}: largest norm excess over eps {largest:.2e}, none outside bounds"
    )


def evidence(white_box_attacks: Sequence[str]) -> str:
    """``white_box`` when a gradient attack on the model itself ran, else ``black_box``."""
    return "white_box" if white_box_attacks else "black_box"


def verdict(
    checks: Sequence[CheckResult], reference_accuracy: float, threshold: float, enabled: bool = True
) -> str:
    """``unchecked`` without checks; ``unreliable`` when any failed; else robust iff accuracy >= threshold.

    Enforced invariants and skipped checks are no evidence either way.
    """
    if not enabled:
        return "unchecked"
    if any(c.passed is False for c in checks):
        return "unreliable"
    return "robust" if reference_accuracy >= threshold else "not robust"
