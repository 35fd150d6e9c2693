"""Judging an evaluation: the battery's sanity checks, computed from its attacks' and probes' results.

Why apart from the battery: the battery decides what runs; this module only reads what ran and
turns it into checks (each function says which evidence it uses, and why that evidence is not
produced by the thing it validates), then lists what the attack base enforces by construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeGuard

from robustcnn.attacks import Attack, AttackResult, GradientAttack, Transfer
from robustcnn.evaluation import checks
from robustcnn.evaluation.checks import CheckResult, CheckSettings, ThreatWitness
from robustcnn.evaluation.probes import SUFFIX as PER_EPS_SUFFIX
from robustcnn.threat import ThreatModel


def is_white_box_gradient(attack: Attack) -> TypeGuard[GradientAttack]:
    """A gradient attack on the model itself (not a transfer from a surrogate)."""
    return isinstance(attack, GradientAttack) and not isinstance(attack, Transfer)


def slack(settings: CheckSettings, stochastic: bool, samples: int) -> float:
    """The tolerance of a comparison at ``samples`` samples.

    On a randomised model every accuracy is itself a random draw, so the comparisons allow two
    binomial standard errors on top of the configured tolerance.
    """
    if not stochastic:
        return settings.tolerance
    return max(settings.tolerance, 2 * math.sqrt(0.25 / max(samples, 1)))


def curves_at(results: Mapping[str, AttackResult], eps: Sequence[float]) -> dict[str, list[float]]:
    """Each attack's robust accuracy at every eps; NaN where it did not run (comparisons skip NaN)."""
    return {
        k: [dict(zip(r.eps, r.robust_accuracy(), strict=True)).get(e, math.nan) for e in eps]
        for k, r in results.items()
    }


def zero_checks(
    worst: Sequence[float],
    eps: Sequence[float],
    undefended: bool,
    unbounded: AttackResult | None,
    settings: CheckSettings,
) -> list[CheckResult]:
    """An undefended model falls to ~0 at the threat's largest eps; every model at an unbounded eps."""
    return [
        checks.reaches_zero(
            "zero_at_largest_eps_undefended",
            worst[-1] if undefended else None,
            eps[-1],
            settings.zero_tolerance,
            "a defended model need not reach 0 at the threat's eps",
        ),
        checks.reaches_zero(
            "zero_at_unbounded_eps",
            unbounded.robust_accuracy()[0] if unbounded else None,
            unbounded.eps[0] if unbounded else None,
            settings.zero_tolerance,
            "needs a PGD attack",
        ),
    ]


def pick(curves: Mapping[str, list[float]], name: str) -> tuple[str, list[float]] | None:
    """``(name, curve)`` for a comparison, None when that attack did not run."""
    return (name, curves[name]) if name in curves else None


def single_step_check(
    curves: Mapping[str, list[float]], stochastic: bool, eps: Sequence[float], tol: float
) -> CheckResult:
    """An iterative attack (PGD, else APGD; the EOT one on a stochastic model) beats FGSM."""
    iterative = ("apgd", "pgd") if "pgd" not in curves else ("pgd",)
    pgd_name = next((f"eot_{n}" for n in iterative if stochastic and f"eot_{n}" in curves), None) or next(
        (n for n in iterative if n in curves), "pgd"
    )
    fgsm_name = "eot_fgsm" if stochastic and "eot_fgsm" in curves else "fgsm"
    return checks.not_above(
        "iterative_beats_single_step",
        pick(curves, pgd_name),
        pick(curves, fgsm_name),
        eps,
        tol,
        "PGD and FGSM",
    )


def effort_check(
    results: Mapping[str, AttackResult],
    strong: AttackResult | None,
    reference_pgd: str | None,
    eps: Sequence[float],
    settings: CheckSettings,
    stochastic: bool,
) -> CheckResult:
    """More steps and restarts do not lower the reference attack's accuracy (on the probe samples).

    Why this direction (Carlini et al.: the attack must have converged): the stronger run also
    counts in the worst case, but only on the probe samples; if it gains there, the reference
    attack's figure on every other sample flatters the model. (The opposite, the stronger run doing
    worse, is no failure of the evaluation: the worst case keeps the better of the two.)

    A probe run on selected samples (``strong.rows``: those the attacks left robust, nearest the
    boundary) is judged on every sample: the reference's accuracy against the reference's with the
    samples the stronger run broke counted as broken, so the gain is in points of the whole figure.
    """
    if reference_pgd is None:
        return checks.skip("more_effort_no_gain", "needs a PGD attack")
    if strong is None:
        return checks.skip(
            "more_effort_no_gain", "no sample survived the attacks: more effort cannot lower 0"
        )
    reference = results[reference_pgd]
    rows = [list(eps).index(value) for value in strong.eps]
    if strong.rows is None:
        base = [reference.correct[r, : strong.n] for r in rows]
        stronger = list(strong.correct)
    else:
        base = [reference.correct[r] for r in rows]
        picked = strong.rows
        stronger = [
            b.clone().index_put_((picked,), b[picked] & c) for b, c in zip(base, strong.correct, strict=True)
        ]
    return checks.not_above(
        "more_effort_no_gain",
        (reference_pgd, [float(b.float().mean()) for b in base]),
        (f"{reference_pgd} with more steps/restarts", [float(s.float().mean()) for s in stronger]),
        strong.eps,
        slack(settings, stochastic, int(base[0].shape[0])),
        "a PGD attack",
    )


def baseline_checks(
    curves: Mapping[str, list[float]],
    white: Sequence[str],
    eps: Sequence[float],
    tol: float,
    follow_ups: Mapping[str, tuple[AttackResult, list[int]] | None],
    n: int,
) -> list[CheckResult]:
    """The white-box attacks beat noise, Square and transfer (else the gradients are masked).

    A baseline run on every sample is compared with the best white-box attack's accuracy. A
    baseline run as a follow-up (on the samples the other attacks left correct) is judged by what
    it adds: the samples it broke there, in points of the whole figure, must stay within ``tol``.
    """
    best_white = [min(curves[k][i] for k in white) for i in range(len(eps))] if white else None
    best = ("best white-box", best_white) if best_white is not None else None
    return [
        follow_up_check(f"white_box_beats_{baseline}", baseline, follow_ups[baseline], tol, n)
        if baseline in follow_ups
        else checks.not_above(
            f"white_box_beats_{baseline}",
            best,
            pick(curves, baseline),
            eps,
            tol,
            f"a white-box attack and {baseline}",
        )
        for baseline in ("noise", "square", "transfer")
    ]


def follow_up_check(
    name: str, baseline: str, ran: tuple[AttackResult, list[int]] | None, tol: float, n: int
) -> CheckResult:
    """A follow-up broke at most ``tol`` (fraction of all ``n`` samples) of what the others left robust.

    ``ran``: its result and, per eps it ran at, the samples it broke that every other attack had
    left correct; None when no sample survived the others (nothing was left for it to break).
    """
    if ran is None:
        return checks.skip(
            name, f"every sample fell to the other attacks: {baseline} had nothing left to attack"
        )
    result, added = ran
    broken = dict(zip(result.eps, added, strict=True))
    shown = ", ".join(f"{count} at eps {value:g}" for value, count in broken.items())
    most = max(broken.values())
    detail = (
        f"{result.name} run on the {result.n} samples the white-box attacks left correct broke {shown} "
        f"(allowed: {tol * n:.0f} of {n}, tolerance {tol:g})"
    )
    return checks.CheckResult(name, most <= tol * n, detail)


def eot_attacks(named: Mapping[str, Attack], white: Sequence[str]) -> list[str]:
    """The white-box gradient attacks that average their gradient over more than one draw."""
    return [k for k in white if getattr(named[k], "eot_samples", 1) > 1]


def eot_pairs(
    curves: Mapping[str, list[float]], named: Mapping[str, Attack], eot: Sequence[str]
) -> dict[str, tuple[list[float], list[float]]]:
    """Each EOT attack's curve beside the same attack's with one draw (where both ran)."""
    single = {k.removeprefix("eot_"): k for k in eot}
    return {
        k: (curves[k], curves[base])
        for base, k in single.items()
        if base in curves and getattr(named.get(base), "eot_samples", None) == 1
    }


def monotone_check(
    probe: AttackResult | None,
    curves: Mapping[str, list[float]],
    worst: Sequence[float],
    targeted: bool,
    tol: float,
) -> CheckResult:
    """Monotone in eps, judged on the per-eps probe (and, for a targeted threat, the reported curves).

    For a targeted threat the base's carried first success does not make the reported robust
    accuracy monotone (a sample may miss the target yet be misclassified), so they can be judged too.
    """
    judged = {probe.name: probe.robust_accuracy()} if probe is not None else {}
    if targeted:
        judged.update({k: v for k, v in curves.items() if not any(math.isnan(a) for a in v)})
        judged["worst_case"] = list(worst)
    return checks.monotone_in_eps(judged, tol, "needs a PGD or APGD attack (the per-eps probe)")


def enforced_invariants(targeted: bool) -> list[CheckResult]:
    """What the attack base guarantees by construction (attacks/contract.py, attacks/batches.py):
    listed, never a pass."""
    listed = [
        checks.enforced(
            "model_unchanged_by_attacks",
            "attacks run in eval mode with frozen parameters, and the base raises if a parameter "
            "gradient appeared",
        ),
        checks.enforced(
            "success_measured_on_reported_examples",
            "the base measures success with the model's own logits of each projected example it reports, "
            "never from an attack's bookkeeping",
        ),
    ]
    if not targeted:
        listed.append(
            checks.enforced(
                "reported_curves_monotone_in_eps",
                "the base keeps a sample's first success at every larger eps, so no reported curve can "
                "rise; monotone_in_eps judges the per-eps probe instead",
            )
        )
    return listed


def judge(
    results: Mapping[str, AttackResult],
    probes: Mapping[str, AttackResult],
    worst: Sequence[float],
    threat: ThreatModel,
    *,
    undefended: bool,
    stochastic: bool,
    gradient: tuple[float | None, float | None],
    reference_pgd: str | None,
    settings: CheckSettings,
    named: Mapping[str, Attack],
    witnesses: Mapping[str, ThreatWitness],
    follow_ups: Mapping[str, tuple[AttackResult, list[int]] | None] | None = None,
) -> list[CheckResult]:
    """All sanity checks (README, "Attacks and the evaluation"), in a fixed order (each function says why);
    then the invariants the base enforces."""
    eps = list(threat.eps)
    n = int(next(iter(results.values())).n)
    tol = slack(settings, stochastic, n)
    curves = curves_at(results, eps)
    white = [k for k, a in named.items() if is_white_box_gradient(a)]
    unbounded = probes.get(f"{reference_pgd}_unbounded") if reference_pgd else None
    strong = probes.get(f"{reference_pgd}_strong") if reference_pgd else None
    per_eps = probes.get(f"{reference_pgd}{PER_EPS_SUFFIX}") if reference_pgd else None
    per_eps_tol = slack(settings, stochastic, per_eps.n if per_eps else n)
    eot = eot_attacks(named, white)
    return [
        monotone_check(per_eps, curves, worst, threat.targeted, per_eps_tol),
        *zero_checks(worst, eps, undefended, unbounded, settings),
        single_step_check(curves, stochastic, eps, tol),
        effort_check(results, strong, reference_pgd, eps, settings, stochastic),
        *baseline_checks(curves, white, eps, tol, follow_ups or {}, n),
        checks.gradient_health(*gradient, settings.max_zero_gradient_fraction),
        checks.stochastic_handled(stochastic, white, eot, eot_pairs(curves, named, eot), eps, tol),
        checks.within_threat(
            witnesses,
            {
                k: r.n * len(r.eps)
                for k, r in {
                    **results,
                    **probes,
                    **{k: ran[0] for k, ran in (follow_ups or {}).items() if ran},
                }.items()
            },
        ),
        *enforced_invariants(threat.targeted),
    ]
