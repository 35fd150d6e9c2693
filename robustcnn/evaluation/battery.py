"""The attack battery: every attack of a job on one model, the per-sample worst case, and the checks.

Why a battery rather than one attack: the honest robust accuracy is the fraction of samples that
survive *every* attack run (per-sample worst case), and the sanity checks only mean something when
the attacks that they compare ran on the same samples. The battery also adds what an honest
evaluation needs whatever the user selected: the random-noise floor, EOT variants for a stochastic
model, and strength probes (more steps and restarts; an unbounded eps) whose results also count
in the worst case, so no reported number is one that a stronger attack we ran would lower.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.attacks import APGD, PGD, Attack, AttackResult, GradientAttack, RandomNoise, Transfer
from robustcnn.attacks.base import attack_mode
from robustcnn.batching import in_batches
from robustcnn.config import config_bool, config_float, config_int, config_section
from robustcnn.evaluation import checks
from robustcnn.evaluation.checks import CheckResult, CheckSettings
from robustcnn.threat import ThreatModel

log = logging.getLogger(__name__)


#: The settings of the ``checks`` config section.
CHECKS_KEYS = (
    "enabled",
    "tolerance",
    "zero_tolerance",
    "max_zero_gradient_fraction",
    "robust_threshold",
    "probe_samples",
    "strong_steps_factor",
    "strong_extra_restarts",
    "eot_samples",
)


@dataclass(frozen=True)
class BatterySettings:
    """The ``checks`` config section."""

    enabled: bool = True
    probe_samples: int = 200
    eot_samples: int = 10
    strong_steps_factor: float = 2.5
    strong_extra_restarts: int = 1
    checks: CheckSettings = field(default_factory=CheckSettings)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> BatterySettings:
        """Build from the ``checks`` config section; a wrong value fails naming ``checks.<key>``."""
        cfg = config_section(cfg, "checks", CHECKS_KEYS)
        for key in ("tolerance", "zero_tolerance", "max_zero_gradient_fraction", "robust_threshold"):
            if key in cfg:  # accuracy fractions
                cfg[key] = config_float(cfg[key], f"checks.{key}", minimum=0.0, maximum=1.0)
        return cls(
            enabled=config_bool(cfg.get("enabled", True), "checks.enabled"),
            probe_samples=config_int(
                cfg.get("probe_samples", cls.probe_samples), "checks.probe_samples", minimum=1
            ),
            eot_samples=config_int(cfg.get("eot_samples", cls.eot_samples), "checks.eot_samples", minimum=1),
            strong_steps_factor=config_float(
                cfg.get("strong_steps_factor", cls.strong_steps_factor),
                "checks.strong_steps_factor",
                minimum=1.0,
            ),
            strong_extra_restarts=config_int(
                cfg.get("strong_extra_restarts", cls.strong_extra_restarts),
                "checks.strong_extra_restarts",
                minimum=0,
            ),
            checks=CheckSettings.from_mapping(cfg),
        )


@dataclass
class BatteryResult:
    threat: ThreatModel
    clean_accuracy: float
    n: int
    attacks: dict[str, AttackResult]
    probes: dict[str, AttackResult]
    worst_correct: Tensor  # bool [E, N]
    stochastic: bool
    gradient_zero_fraction: float | None
    gradient_nan_fraction: float | None
    checks: list[CheckResult]
    verdict: str
    reference_eps: float

    def full_curve(self, name: str, values: Sequence[float] | None = None) -> list[float | None]:
        """Attack ``name``'s per-eps values on the threat's whole eps list (None where it did not run).

        Attacks in ``reference_only`` ran at the probe eps only (reference and largest), so their
        own lists are shorter than the threat's.
        """
        result = self.attacks[name]
        values = result.robust_accuracy() if values is None else list(values)
        by_eps = dict(zip(result.eps, values, strict=True))
        return [by_eps.get(e) for e in self.threat.eps]

    def worst_case_robust_accuracy(self) -> list[float]:
        return [float(v) for v in self.worst_correct.float().mean(1)]

    def naive_worst_case(self) -> list[float]:
        """Worst case over the attacks without EOT (what a naive evaluation would report)."""
        naive = [
            r.correct
            for k, r in self.attacks.items()
            if not k.startswith("eot_") and r.eps == self.threat.eps
        ]
        return [float(v) for v in torch.stack(naive).all(0).float().mean(1)]

    def reference_robust_accuracy(self) -> float:
        return self.worst_case_robust_accuracy()[list(self.threat.eps).index(self.reference_eps)]

    def to_dict(self) -> dict[str, Any]:
        """The robustness part of ``results.json``."""
        everything = {**self.attacks, **self.probes}
        return {
            "threat": self.threat.to_dict(),
            "eps": list(self.threat.eps),
            "n_attacked": self.n,
            "robust_accuracy": {k: self.full_curve(k) for k in self.attacks},
            "worst_case_robust_accuracy": self.worst_case_robust_accuracy(),
            "reference_eps": self.reference_eps,
            "reference_robust_accuracy": self.reference_robust_accuracy(),
            "attack_success_rate": {k: self.full_curve(k, r.success_rate()) for k, r in self.attacks.items()},
            "perturbation_norm": {
                k: {stat: self.full_curve(k, v) for stat, v in r.norm_stats().items()}
                for k, r in self.attacks.items()
            },
            "confidence_drop": {k: self.full_curve(k, r.confidence_drop()) for k, r in self.attacks.items()},
            "probes": {
                k: {"n": r.n, "eps": list(r.eps), "robust_accuracy": r.robust_accuracy(), "params": r.params}
                for k, r in self.probes.items()
            },
            "attacks": {k: {"class": type_name(r), "params": r.params} for k, r in everything.items()},
            "timing": {
                k: {
                    "seconds": r.seconds,
                    "images_per_s": r.images_per_s(),
                    "forward_passes": r.forward_passes,
                    "gradient_passes": r.gradient_passes,
                }
                for k, r in everything.items()
            },
            "stochastic": self.stochastic,
            # for a randomised model: what single-sample gradients report vs the EOT evaluation
            "naive_worst_case_robust_accuracy": self.naive_worst_case() if self.stochastic else None,
            "gradient_zero_fraction": self.gradient_zero_fraction,
            "gradient_nan_fraction": self.gradient_nan_fraction,
            "checks": [c.to_dict() for c in self.checks],
            "verdict": self.verdict,
        }


def type_name(result: AttackResult) -> str:
    return result.name


#: Where the battery's own checks take their batch size from (named when they run out of memory).
BATCH_SETTING = "eval.attack_batch_size"


def is_stochastic(model: nn.Module, x: Tensor, batch_size: int | None = None) -> bool:
    """Two eval-mode forward passes on the same input differ: the model is randomised.

    In batches of ``batch_size`` (all of ``x`` by default), halved when the device runs out of memory.
    """

    def differs(begin: int, end: int) -> bool:
        return not torch.equal(model(x[begin:end]), model(x[begin:end]))

    with attack_mode(model), torch.no_grad():
        verdicts = in_batches(
            differs,
            x.shape[0],
            batch_size or x.shape[0],
            what="the stochasticity check",
            setting=BATCH_SETTING,
        )
    return any(verdicts)


def gradient_stats(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int | None = None
) -> tuple[float, float]:
    """Fractions of inputs whose cross-entropy input gradient is all zero / not finite.

    In batches of ``batch_size`` (all of ``x`` by default), halved when the device runs out of
    memory; each input's gradient does not depend on the batch (eval mode, summed loss).
    """

    def zero_and_nan(begin: int, end: int) -> tuple[Tensor, Tensor]:
        xg = x[begin:end].detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xg).float(), y[begin:end], reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
        flat = grad.flatten(1)
        nan = ~torch.isfinite(flat).all(1)
        return (flat.abs().amax(1) == 0) & ~nan, nan

    with attack_mode(model):
        parts = in_batches(
            zero_and_nan,
            x.shape[0],
            batch_size or x.shape[0],
            what="the gradient check",
            setting=BATCH_SETTING,
        )
    zero = torch.cat([z for z, _ in parts])
    nan = torch.cat([n for _, n in parts])
    return float(zero.float().mean()), float(nan.float().mean())


def _with_eot(attack: GradientAttack, samples: int) -> GradientAttack:
    clone = copy.copy(attack)
    clone.eot_samples = samples
    clone.name = f"eot_{attack.name}"  # type: ignore[misc]
    return clone


def _unique_names(attacks: Sequence[Attack]) -> dict[str, Attack]:
    named: dict[str, Attack] = {}
    for attack in attacks:
        name, i = attack.name, 2
        while name in named:
            name, i = f"{attack.name}_{i}", i + 1
        named[name] = attack
    return named


def _large_eps(threat: ThreatModel, shape: Sequence[int]) -> float:
    """A radius that admits any image: 1 for linf, the cube's diameter for l2."""
    return 1.0 if threat.norm == "linf" else math.sqrt(math.prod(shape))


def run_battery(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    attacks: Sequence[Attack],
    *,
    undefended: bool,
    settings: BatterySettings | None = None,
    clean_accuracy: float | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    reference_only: Sequence[str] = (),
) -> BatteryResult:
    """Run ``attacks`` (+ noise floor, EOT variants, probes) on ``model`` and judge the evaluation.

    Attacks named in ``reference_only`` run at the probe eps only (the reference eps and the largest):
    an expensive query attack (Square with a real budget) costs 2 eps instead of the whole list, and
    still counts in the worst case and in the white-box-beats-it check where it ran.
    """
    settings = settings or BatterySettings()
    device = device or next(model.parameters()).device
    x, y = x.to(device), y.to(device).long()
    n = int(x.shape[0])
    probe_n = min(n, settings.probe_samples)
    seed = attacks[0].seed if attacks else 0
    batch_size = attacks[0].batch_size if attacks else 256

    stochastic = is_stochastic(model, x[: min(n, 64)], batch_size)
    selected = list(attacks)
    if not any(isinstance(a, RandomNoise) for a in selected):
        selected.append(RandomNoise(seed=seed, batch_size=batch_size))
    gradient_attacks = [a for a in selected if isinstance(a, GradientAttack) and not isinstance(a, Transfer)]
    if stochastic:
        selected += [_with_eot(a, settings.eot_samples) for a in gradient_attacks if a.eot_samples == 1]
    named = _unique_names(selected)

    reference = threat.reference_eps if threat.reference_eps is not None else threat.eps[-1]
    probe_eps = tuple(sorted({reference, threat.eps[-1]} - {0.0})) or (threat.eps[-1],)

    def restricted(eps: tuple[float, ...]) -> ThreatModel:
        return ThreatModel(
            norm=threat.norm,
            eps=eps,
            targeted=threat.targeted,
            target=threat.target,
            target_class=threat.target_class,
        )

    results: dict[str, AttackResult] = {}
    for name, attack in named.items():
        log.info("attack %s: %r", name, attack)
        attack.progress = progress
        sparse = name in reference_only or name.removeprefix("eot_") in reference_only
        results[name] = attack.run(model, x, y, restricted(probe_eps) if sparse else threat)

    probes: dict[str, AttackResult] = {}
    reference_pgd = next(
        (k for k, a in named.items() if isinstance(a, (PGD, APGD)) and (not stochastic or a.eot_samples > 1)),
        None,
    )
    if settings.enabled and reference_pgd is not None:
        base: PGD | APGD = named[reference_pgd]  # type: ignore[assignment]
        strong = copy.copy(base)
        strong.steps = max(base.steps + 1, int(round(base.steps * settings.strong_steps_factor)))
        strong.restarts = base.restarts + settings.strong_extra_restarts
        strong.seed = base.seed + 1
        # at the verdict's eps and the largest one: where a too-weak attack would mislead most
        strong_threat = restricted(probe_eps)
        probes[f"{reference_pgd}_strong"] = strong.run(model, x[:probe_n], y[:probe_n], strong_threat)
        large = _large_eps(threat, tuple(x.shape[1:]))
        unbounded_threat = ThreatModel(norm=threat.norm, eps=(large,), targeted=False)
        probes[f"{reference_pgd}_unbounded"] = base.run(model, x[:probe_n], y[:probe_n], unbounded_threat)

    eps_rows = {value: i for i, value in enumerate(threat.eps)}
    full = [r for r in results.values() if r.eps == threat.eps]
    worst = torch.stack([r.correct for r in full]).all(0)
    for probe in (*[r for r in results.values() if r.eps != threat.eps], *probes.values()):
        for j, value in enumerate(probe.eps):
            if value in eps_rows:
                worst[eps_rows[value], : probe.n] &= probe.correct[j]

    zero_frac = nan_frac = None
    if settings.enabled and gradient_attacks:
        zero_frac, nan_frac = gradient_stats(model, x[:probe_n], y[:probe_n], batch_size)

    clean = (
        clean_accuracy
        if clean_accuracy is not None
        else float(results[next(iter(results))].clean_correct.float().mean())
    )
    eps = list(threat.eps)
    reference_eps = threat.reference_eps if threat.reference_eps is not None else eps[-1]
    worst_curve = [float(v) for v in worst.float().mean(1)]
    check_list = (
        judge(
            results,
            probes,
            worst_curve,
            eps,
            undefended=undefended,
            stochastic=stochastic,
            gradient=(zero_frac, nan_frac),
            reference_pgd=reference_pgd,
            settings=settings.checks,
            named=named,
        )
        if settings.enabled
        else []
    )
    reference_accuracy = worst_curve[eps.index(reference_eps)]
    final = checks.verdict(check_list, reference_accuracy, settings.checks.robust_threshold)
    return BatteryResult(
        threat=threat,
        clean_accuracy=clean,
        n=n,
        attacks=results,
        probes=probes,
        worst_correct=worst,
        stochastic=stochastic,
        gradient_zero_fraction=zero_frac,
        gradient_nan_fraction=nan_frac,
        checks=check_list,
        verdict=final,
        reference_eps=reference_eps,
    )


def judge(
    results: Mapping[str, AttackResult],
    probes: Mapping[str, AttackResult],
    worst: Sequence[float],
    eps: Sequence[float],
    *,
    undefended: bool,
    stochastic: bool,
    gradient: tuple[float | None, float | None],
    reference_pgd: str | None,
    settings: CheckSettings,
    named: Mapping[str, Attack],
) -> list[CheckResult]:
    """All sanity checks of DESIGN.md, in a fixed order.

    On a randomised model every accuracy is itself a random draw, so the comparisons allow two
    binomial standard errors (at n samples) on top of the configured tolerance.
    """
    n = int(next(iter(results.values())).n)

    def slack(samples: int) -> float:
        if not stochastic:
            return settings.tolerance
        return max(settings.tolerance, 2 * math.sqrt(0.25 / max(samples, 1)))

    tol = slack(n)
    # attacks run at a subset of the eps (reference_only) get NaN elsewhere: comparisons skip NaN
    curves = {
        k: [dict(zip(r.eps, r.robust_accuracy(), strict=True)).get(e, math.nan) for e in eps]
        for k, r in results.items()
    }
    white = [k for k, a in named.items() if isinstance(a, GradientAttack) and not isinstance(a, Transfer)]
    best_white = [min(curves[k][i] for k in white) for i in range(len(eps))] if white else None

    def pick(*names: str) -> tuple[str, list[float]] | None:
        for name in names:
            if name in curves:
                return name, curves[name]
        return None

    out = [checks.monotone_in_eps(curves, worst, tol)]
    out.append(
        checks.reaches_zero(
            "zero_at_largest_eps_undefended",
            worst[-1] if undefended else None,
            eps[-1],
            settings.zero_tolerance,
            "a defended model need not reach 0 at the threat's eps",
        )
    )
    unbounded = probes.get(f"{reference_pgd}_unbounded") if reference_pgd else None
    out.append(
        checks.reaches_zero(
            "zero_at_unbounded_eps",
            unbounded.robust_accuracy()[0] if unbounded else None,
            unbounded.eps[0] if unbounded else None,
            settings.zero_tolerance,
            "needs a PGD attack",
        )
    )
    iterative = ("apgd", "pgd") if "pgd" not in curves else ("pgd",)
    pgd_name = next((f"eot_{n}" for n in iterative if stochastic and f"eot_{n}" in curves), None) or next(
        (n for n in iterative if n in curves), "pgd"
    )
    fgsm_name = "eot_fgsm" if stochastic and "eot_fgsm" in curves else "fgsm"
    out.append(
        checks.not_above(
            "iterative_beats_single_step", pick(pgd_name), pick(fgsm_name), eps, tol, "PGD and FGSM"
        )
    )
    strong = probes.get(f"{reference_pgd}_strong") if reference_pgd else None
    if strong is not None and reference_pgd is not None:
        rows = [list(eps).index(value) for value in strong.eps]
        base_curve = [float(results[reference_pgd].correct[r, : strong.n].float().mean()) for r in rows]
        out.append(
            checks.not_above(
                "more_effort_no_gain",
                (f"{reference_pgd} with more steps/restarts", strong.robust_accuracy()),
                (reference_pgd, base_curve),
                strong.eps,
                slack(strong.n),
                "a PGD attack",
            )
        )
    else:
        out.append(checks.skip("more_effort_no_gain", "needs a PGD attack"))
    best = ("best white-box", best_white) if best_white is not None else None
    for baseline in ("noise", "square", "transfer"):
        out.append(
            checks.not_above(
                f"white_box_beats_{baseline}",
                best,
                pick(baseline),
                eps,
                tol,
                f"a white-box attack and {baseline}",
            )
        )
    out.append(checks.gradient_health(*gradient, settings.max_zero_gradient_fraction))
    out.append(checks.stochastic_handled(stochastic, [k for k in curves if k.startswith("eot_")], white))
    excess = max(
        float((r.norms - torch.tensor(r.eps).view(-1, 1)).max())
        for r in (*results.values(), *probes.values())
    )
    out_of_bounds = any(
        bool((r.adv_examples < 0).any() or (r.adv_examples > 1).any())
        for r in results.values()
        if r.adv_examples.numel()
    )
    out.append(checks.within_threat(excess, out_of_bounds))
    return out
