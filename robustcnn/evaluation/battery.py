"""The attack battery: every attack of a job on one model, the per-sample worst case, and the checks.

Why a battery rather than one attack: the honest robust accuracy is the fraction of samples that
survive *every* attack run (per-sample worst case), and the sanity checks only mean something when
the attacks that they compare ran on the same samples. The battery also adds what an honest
evaluation needs whatever the user selected: the random-noise floor, EOT variants for a stochastic
model, and strength probes (more steps and restarts; an unbounded eps) whose results also count
in the worst case, so no reported number is one that a stronger attack we ran would lower.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.attacks import APGD, PGD, Attack, AttackResult, RandomNoise, with_eot
from robustcnn.attacks.contract import ExampleInspector, attack_mode, input_bounds
from robustcnn.batching import in_batches
from robustcnn.config import config_bool, config_float, config_int, config_section
from robustcnn.evaluation import checks, minimal
from robustcnn.evaluation.checks import CheckResult, CheckSettings, ThreatWitness
from robustcnn.evaluation.judge import is_white_box_gradient, judge
from robustcnn.evaluation.probes import SUFFIX as PER_EPS_SUFFIX
from robustcnn.evaluation.probes import per_eps_probe
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
    "monotone_samples",
    "monotone_steps",
    "strong_steps_factor",
    "strong_extra_restarts",
    "eot_samples",
)


@dataclass(frozen=True)
class BatterySettings:
    """The ``checks`` config section."""

    enabled: bool = True
    #: the strong probe's images (robust ones, nearest the boundary), the unbounded probe's (first ones)
    probe_samples: int = 100
    #: The per-eps probe (the monotonicity check's evidence): images, and the steps it is capped at.
    monotone_samples: int = 100
    monotone_steps: int = 10
    eot_samples: int = 10
    strong_steps_factor: float = 2.5
    strong_extra_restarts: int = 1
    checks: CheckSettings = field(default_factory=CheckSettings)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> BatterySettings:
        """Build from the ``checks`` config section; a wrong value fails naming ``checks.<key>``.

        (Any: YAML values from Hydra are untyped until checked here.)
        """
        cfg = config_section(cfg, "checks", CHECKS_KEYS)
        for key in ("tolerance", "zero_tolerance", "max_zero_gradient_fraction", "robust_threshold"):
            if key in cfg:  # accuracy fractions
                cfg[key] = config_float(cfg[key], f"checks.{key}", minimum=0.0, maximum=1.0)
        return cls(
            enabled=config_bool(cfg.get("enabled", True), "checks.enabled"),
            probe_samples=config_int(
                cfg.get("probe_samples", cls.probe_samples), "checks.probe_samples", minimum=1
            ),
            monotone_samples=config_int(
                cfg.get("monotone_samples", cls.monotone_samples), "checks.monotone_samples", minimum=1
            ),
            monotone_steps=config_int(
                cfg.get("monotone_steps", cls.monotone_steps),
                "checks.monotone_steps",
                minimum=2,
                hint=" (APGD needs at least 2)",
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
    #: white_box: a gradient attack on the model itself ran; black_box: only noise, Square, transfer
    evidence: str = "white_box"
    #: Attacks run after the others, on the samples those left correct (:func:`run_follow_ups`).
    follow_ups: dict[str, AttackResult] = field(default_factory=dict)
    #: Per follow-up and eps it ran at: the samples it broke that every other attack left correct.
    newly_broken: dict[str, list[int]] = field(default_factory=dict)

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
        """The robustness part of ``results.json``.

        (Any: a JSON document of nested, mixed values, which the jobs extend with their own sections.)
        """
        everything = {**self.attacks, **self.probes, **self.follow_ups}
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
            # with a minimum-norm attack: the per-sample minimal perturbation's quartiles (no eps choice)
            "minimal_perturbation": minimal.summary(self.attacks, self.threat.norm),
            "probes": {
                k: {
                    "n": r.n,
                    # the first n images, or those the attacks left robust, nearest the boundary
                    "samples": "first" if r.rows is None else "robust_near_boundary",
                    "eps": list(r.eps),
                    "robust_accuracy": r.robust_accuracy(),
                    "params": r.params,
                }
                for k, r in self.probes.items()
            },
            # on the samples every other attack left correct: how many more each broke, per eps
            "follow_ups": {k: follow_up_summary(r, self.newly_broken[k]) for k, r in self.follow_ups.items()},
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
            "evidence": self.evidence,
        }


def type_name(result: AttackResult) -> str:
    return result.name


def follow_up_summary(result: AttackResult, newly_broken: list[int]) -> dict[str, Any]:
    """A follow-up attack in results.json: its samples, and what it broke of them per eps."""
    return {
        "samples": "survivors",
        "n": result.n,
        "eps": list(result.eps),
        "newly_broken": newly_broken,
        "robust_accuracy_on_samples": result.robust_accuracy(),
        "params": result.params,
    }


#: The threat-model check's witness of an attack, by the name it reports under.
InspectorFor = Callable[[str], ExampleInspector]


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


def unique_names(attacks: Sequence[Attack]) -> dict[str, Attack]:
    """The attacks by the name they report under; a repeated name gets ``_2``, ``_3``, ..."""
    named: dict[str, Attack] = {}
    for attack in attacks:
        name, i = attack.name, 2
        while name in named:
            name, i = f"{attack.name}_{i}", i + 1
        named[name] = attack
    return named


def large_eps(threat: ThreatModel, shape: Sequence[int]) -> float:
    """A radius that admits any image: 1 for linf, the cube's diameter for l2."""
    return 1.0 if threat.norm == "linf" else math.sqrt(math.prod(shape))


def with_eps(threat: ThreatModel, eps: tuple[float, ...]) -> ThreatModel:
    """``threat`` at other radii (same norm and targeting; the knowledge and reference are dropped)."""
    return ThreatModel(
        norm=threat.norm,
        eps=eps,
        targeted=threat.targeted,
        target=threat.target,
        target_class=threat.target_class,
    )


def reference_eps(threat: ThreatModel) -> float:
    """The eps the verdict is judged at: the threat's reference, else its largest."""
    return threat.reference_eps if threat.reference_eps is not None else threat.eps[-1]


def probe_eps(threat: ThreatModel) -> tuple[float, ...]:
    """Where probes and ``reference_only`` attacks run: the reference eps and the largest (not 0)."""
    return tuple(sorted({reference_eps(threat), threat.eps[-1]} - {0.0})) or (threat.eps[-1],)


def select_attacks(
    attacks: Sequence[Attack], stochastic: bool, eot_samples: int, batch_size: int
) -> dict[str, Attack]:
    """The attacks the battery runs, by name: the caller's, the noise floor, EOT variants.

    The noise floor runs whatever was selected (the baseline every real attack must beat); on a
    stochastic model every white-box gradient attack without EOT also runs as ``eot_<name>``.
    """
    selected = list(attacks)
    if not any(isinstance(a, RandomNoise) for a in selected):
        seed = attacks[0].seed if attacks else 0
        selected.append(RandomNoise(seed=seed, batch_size=batch_size))
    if stochastic:
        selected += [
            with_eot(a, eot_samples) for a in selected if is_white_box_gradient(a) and a.eot_samples == 1
        ]
        if any(isinstance(a, APGD) for a in selected) and not any(is_fixed_step(a) for a in selected):
            # APGD halves its step when the objective stops rising, which a noisy loss does at random
            seed = attacks[0].seed if attacks else 0
            selected.append(with_eot(PGD(seed=seed, batch_size=batch_size), eot_samples))
    return unique_names(selected)


def is_fixed_step(attack: Attack) -> bool:
    """A PGD (fixed step size; not APGD, whose step adapts to the loss) that computes gradients."""
    return isinstance(attack, PGD) and is_white_box_gradient(attack)


def listed(name: str, names: Sequence[str]) -> bool:
    """``name`` (or the attack it is the EOT variant of) is one of ``names``."""
    return name in names or name.removeprefix("eot_") in names


def run_selected(
    named: Mapping[str, Attack],
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    reference_only: Sequence[str],
    progress: bool,
    inspector_for: InspectorFor | None = None,
) -> dict[str, AttackResult]:
    """Run every attack, in order; those in ``reference_only`` (or their EOT variant) at the probe eps.

    ``inspector_for(name)`` is shown every example attack ``name`` reports (the threat-model check).
    """
    results: dict[str, AttackResult] = {}
    for name, attack in named.items():
        log.info("attack %s: %r", name, attack)
        attack.progress = progress
        sparse = listed(name, reference_only)
        results[name] = attack.run(
            model,
            x,
            y,
            with_eps(threat, probe_eps(threat)) if sparse else threat,
            inspector=inspector_for(name) if inspector_for else None,
        )
    return results


def split_follow_ups(
    named: Mapping[str, Attack], survivors_only: Sequence[str]
) -> tuple[dict[str, Attack], dict[str, Attack]]:
    """(the main attacks, the follow-ups): those named in ``survivors_only`` (or their EOT variant).

    Without a white-box gradient attack among the others there are no follow-ups: a black-box
    model's Square and noise are its main attacks, run on every sample.
    """
    follow = {k: a for k, a in named.items() if listed(k, survivors_only)}
    main = {k: a for k, a in named.items() if k not in follow}
    if not any(is_white_box_gradient(a) for a in main.values()):
        return dict(named), {}
    return main, follow


def run_follow_ups(
    follow: Mapping[str, Attack],
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    main_worst: Tensor,
    reference_only: Sequence[str],
    progress: bool,
    inspector_for: InspectorFor | None = None,
) -> dict[str, AttackResult]:
    """Each follow-up attack, on the samples every main attack left correct at its smallest eps (> 0).

    ``main_worst``: :func:`worst_case` of the main attacks' results.

    Why (AutoAttack's cascade): noise and Square are there to catch what the gradient attacks
    missed; on a sample the gradient attacks already broke they can change nothing, and on a
    weakly robust model those are nearly all of the budget. Each result carries its ``rows`` and
    counts in the worst case there; the baseline checks ask how many more samples it broke.
    """
    found: dict[str, AttackResult] = {}
    for name, attack in follow.items():
        sparse = listed(name, reference_only)
        at = with_eps(threat, probe_eps(threat)) if sparse else threat
        # eps 0 changes no image: the survivors of the smallest real radius are those worth attacking
        smallest = min((value for value in at.eps if value > 0), default=at.eps[0])
        rows = main_worst[list(threat.eps).index(smallest)].nonzero().flatten()
        if rows.numel() == 0:
            log.info("follow-up %s: every sample already broken, nothing to attack", name)
            continue
        log.info("follow-up %s on %d surviving samples: %r", name, rows.numel(), attack)
        attack.progress = progress
        picked = rows.to(x.device)
        inspector = inspector_for(name) if inspector_for else None
        result = attack.run(model, x[picked], y[picked], at, inspector=inspector)
        found[name] = dataclasses.replace(result, rows=rows.cpu())
    return found


def newly_broken(
    follow_ups: Mapping[str, AttackResult], threat: ThreatModel, main_worst: Tensor
) -> dict[str, list[int]]:
    """Per follow-up and eps it ran at: the samples it broke where every main attack had failed.

    (A follow-up attacks the survivors of its smallest eps at each of its eps; at a larger eps some
    of them had already fallen to the main attacks, and breaking those again adds nothing.)
    """
    eps_rows = {value: i for i, value in enumerate(threat.eps)}
    return {
        name: [
            int((~correct & main_worst[eps_rows[value], result.rows]).sum())
            for value, correct in zip(result.eps, result.correct, strict=True)
        ]
        for name, result in follow_ups.items()
        if result.rows is not None
    }


def reference_attack(named: Mapping[str, Attack], stochastic: bool) -> tuple[str, PGD | APGD] | None:
    """The first PGD or APGD (with EOT on a stochastic model), by name: the attack the probes strengthen.

    On a stochastic model a fixed-step PGD-EOT comes first: APGD's step-size rule stalls on the noisy
    loss, so strengthening it would say little about what more effort gains.
    """
    eligible = [
        (name, attack)
        for name, attack in named.items()
        if isinstance(attack, (PGD, APGD)) and (not stochastic or attack.eot_samples > 1)
    ]
    if stochastic:
        eligible.sort(key=lambda item: not isinstance(item[1], PGD))  # stable: PGD first, else in order
    return eligible[0] if eligible else None


def near_boundary(
    results: Mapping[str, AttackResult], threat: ThreatModel, worst: Tensor, count: int
) -> Tensor:
    """At most ``count`` of the samples every attack left robust at the verdict's eps, nearest the
    boundary first. Returned in ascending order (empty when no sample survived).

    Why these: more effort can only lower the worst case on a sample no attack broke yet, and it
    breaks first those that an attack already pushed close to another class. Nearness: the lowest
    true-class probability that any attack's example reached there.
    """
    ref = reference_eps(threat)
    robust = worst[list(threat.eps).index(ref)]
    prob = torch.ones(robust.shape[0])
    for result in results.values():
        if ref in result.eps and result.rows is None:
            prob = torch.minimum(prob, result.true_prob_adv[list(result.eps).index(ref)].float())
    candidates = robust.nonzero().flatten()
    return candidates[prob[candidates].argsort(stable=True)][:count].sort().values


def run_probes(
    reference: PGD | APGD,
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    settings: BatterySettings,
    inspector_for: InspectorFor,
    strong_rows: Tensor,
) -> dict[str, AttackResult]:
    """The strength probes: more effort, an unbounded eps, and every eps on its own.

    On the samples ``strong_rows`` (:func:`near_boundary`: where more effort can change the answer),
    ``<name>_strong`` (more steps and restarts, another seed) runs at the verdict's eps and the
    largest one, where a too-weak attack would mislead most (not at all when no sample survived).
    On the first ``probe_samples`` images, ``<name>_unbounded`` runs at a radius that admits any
    image, where every model must fall. On the first ``monotone_samples``, ``<name>_per_eps`` runs at
    each eps independently (probes.py).
    """
    probe_n = min(int(x.shape[0]), settings.probe_samples)
    strong = reference.with_(
        steps=max(reference.steps + 1, int(round(reference.steps * settings.strong_steps_factor))),
        restarts=reference.restarts + settings.strong_extra_restarts,
        seed=reference.seed + 1,
    )
    unbounded = ThreatModel(norm=threat.norm, eps=(large_eps(threat, tuple(x.shape[1:])),), targeted=False)
    sub_x, sub_y, at_probe_eps = x[:probe_n], y[:probe_n], with_eps(threat, probe_eps(threat))
    picked = strong_rows.to(x.device)
    found: dict[str, AttackResult] = {}
    if picked.numel():  # none when every sample is already broken: more effort cannot lower 0 robust
        result = strong.run(
            model, x[picked], y[picked], at_probe_eps, inspector=inspector_for(f"{name}_strong")
        )
        found[f"{name}_strong"] = dataclasses.replace(result, rows=strong_rows.cpu())
    return {
        **found,
        f"{name}_unbounded": reference.run(
            model, sub_x, sub_y, unbounded, inspector=inspector_for(f"{name}_unbounded")
        ),
        f"{name}{PER_EPS_SUFFIX}": per_eps_probe(
            reference,
            name,
            model,
            x,
            y,
            threat,
            samples=settings.monotone_samples,
            steps=settings.monotone_steps,
            inspector_for=inspector_for,
        ),
    }


def witnesses_for(model: nn.Module, threat: ThreatModel) -> tuple[dict[str, ThreatWitness], InspectorFor]:
    """The witnesses of the threat-model check, and how an attack run gets its own (by name)."""
    witnesses: dict[str, ThreatWitness] = {}
    bounds = input_bounds(model)

    def inspector_for(name: str) -> ExampleInspector:
        return witnesses.setdefault(name, ThreatWitness(threat.norm, bounds))

    return witnesses, inspector_for


def worst_case(
    threat: ThreatModel, results: Mapping[str, AttackResult], probes: Mapping[str, AttackResult]
) -> Tensor:
    """Per eps and sample: correct under every attack run (bool [E, N]).

    Attacks that ran at a subset of the eps, and probes (on the first samples only), count where
    they ran: no reported number is one that a stronger attack we ran would lower. A minimum-norm
    attack's verified per-sample minimal norms count at every eps (a sample is broken at each eps
    at least as large), so the worst case is, per sample and eps, the minimum over it and the
    fixed-eps attacks.
    """
    eps_rows = {value: i for i, value in enumerate(threat.eps)}
    full = [r for r in results.values() if r.eps == threat.eps]
    worst = torch.stack([r.correct for r in full]).all(0)
    radii = torch.tensor(threat.eps, dtype=torch.float32).view(-1, 1)
    for searched in results.values():
        if searched.min_norms is not None:  # verified minimal norms speak for every eps
            worst[:, : searched.n] &= searched.min_norms.view(1, -1) > radii
    for probe in (*[r for r in results.values() if r.eps != threat.eps], *probes.values()):
        columns = probe.rows if probe.rows is not None else torch.arange(probe.n)
        for j, value in enumerate(probe.eps):
            if value in eps_rows:
                worst[eps_rows[value], columns] &= probe.correct[j]
    return worst


def strength_probes(
    reference: tuple[str, PGD | APGD] | None,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    results: Mapping[str, AttackResult],
    follow_ups: Mapping[str, AttackResult],
    settings: BatterySettings,
    inspector_for: InspectorFor,
) -> dict[str, AttackResult]:
    """The strength probes on the samples the attacks left robust nearest the boundary (none if off)."""
    if not settings.enabled or reference is None:
        return {}
    worst = worst_case(threat, results, follow_ups)
    attacked = near_boundary(results, threat, worst, settings.probe_samples)
    return run_probes(reference[1], reference[0], model, x, y, threat, settings, inspector_for, attacked)


def gradient_figures(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    named: Mapping[str, Attack],
    settings: BatterySettings,
    batch_size: int,
) -> tuple[float | None, float | None]:
    """:func:`gradient_stats` on the first ``probe_samples`` images when the checks are on and a
    white-box gradient attack ran (the gradient check concerns those); (None, None) otherwise."""
    if not settings.enabled or not any(is_white_box_gradient(a) for a in named.values()):
        return None, None
    probe_n = min(int(x.shape[0]), settings.probe_samples)
    return gradient_stats(model, x[:probe_n], y[:probe_n], batch_size)


@dataclass
class _Evidence:
    """Everything the attacks of one battery produced, before it is judged.

    Why apart from :class:`BatteryResult`: the judge needs the follow-ups' own list and the main
    attacks' ``reference_pgd``, which the result does not keep; the result needs the verdict, which
    only the judge gives.
    """

    named: dict[str, Attack]
    stochastic: bool
    witnesses: dict[str, ThreatWitness]
    results: dict[str, AttackResult]
    follow: dict[str, Attack]
    follow_ups: dict[str, AttackResult]
    added: dict[str, list[int]]
    reference_pgd: str | None
    probes: dict[str, AttackResult]
    worst: Tensor
    gradient: tuple[float | None, float | None]


def _attack_all(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    attacks: Sequence[Attack],
    settings: BatterySettings,
    progress: bool,
    reference_only: Sequence[str],
    survivors_only: Sequence[str],
) -> _Evidence:
    """The main attacks, then the follow-ups on their survivors, then the strength probes on what
    every attack left robust, and the gradient figures (see :func:`run_battery`)."""
    batch_size = attacks[0].batch_size if attacks else 256
    stochastic = is_stochastic(model, x[: min(int(x.shape[0]), 64)], batch_size)
    named = select_attacks(attacks, stochastic, settings.eot_samples, batch_size)
    witnesses, inspector_for = witnesses_for(model, threat)
    inspecting = inspector_for if settings.enabled else None
    main, follow = split_follow_ups(named, survivors_only)
    results = run_selected(main, model, x, y, threat, reference_only, progress, inspecting)
    main_worst = worst_case(threat, results, {})
    follow_ups = run_follow_ups(follow, model, x, y, threat, main_worst, reference_only, progress, inspecting)
    reference = reference_attack(main, stochastic)
    probes = strength_probes(reference, model, x, y, threat, results, follow_ups, settings, inspector_for)
    return _Evidence(
        named=dict(named),
        stochastic=stochastic,
        witnesses=witnesses,
        results=results,
        follow=dict(follow),
        follow_ups=follow_ups,
        added=newly_broken(follow_ups, threat, main_worst),
        reference_pgd=reference[0] if reference is not None else None,
        probes=probes,
        worst=worst_case(threat, results, {**probes, **follow_ups}),
        gradient=gradient_figures(model, x, y, named, settings, batch_size),
    )


def _judged(
    evidence: _Evidence,
    worst_curve: list[float],
    threat: ThreatModel,
    settings: BatterySettings,
    undefended: bool,
) -> list[CheckResult]:
    """The sanity checks of the battery (none when ``checks.enabled`` is false)."""
    if not settings.enabled:
        return []
    e = evidence
    return judge(
        e.results,
        e.probes,
        worst_curve,
        threat,
        undefended=undefended,
        stochastic=e.stochastic,
        gradient=e.gradient,
        reference_pgd=e.reference_pgd,
        settings=settings.checks,
        named=e.named,
        witnesses=e.witnesses,
        # a follow-up that found no survivor to attack is judged as such (None)
        follow_ups={k: (e.follow_ups[k], e.added[k]) if k in e.follow_ups else None for k in e.follow},
    )


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
    survivors_only: Sequence[str] = (),
) -> BatteryResult:
    """Run ``attacks`` (+ noise floor, EOT variants, probes) on ``model`` and judge the evaluation.

    Attacks named in ``reference_only`` run at the probe eps only (the reference eps and the largest):
    an expensive query attack (Square with a real budget) costs 2 eps instead of the whole list, and
    still counts in the worst case and in the white-box-beats-it check where it ran. Attacks named in
    ``survivors_only`` (e.g. square, noise) run last, on the samples the others left correct
    (:func:`run_follow_ups`), when a white-box gradient attack is among the others.
    """
    settings = settings or BatterySettings()
    device = device or next(model.parameters()).device
    x, y = x.to(device), y.to(device).long()
    e = _attack_all(model, x, y, threat, attacks, settings, progress, reference_only, survivors_only)
    if clean_accuracy is None:
        clean_accuracy = float(e.results[next(iter(e.results))].clean_correct.float().mean())
    worst_curve = [float(v) for v in e.worst.float().mean(1)]
    check_list = _judged(e, worst_curve, threat, settings, undefended)
    reference_accuracy = worst_curve[list(threat.eps).index(reference_eps(threat))]
    return BatteryResult(
        threat=threat,
        clean_accuracy=clean_accuracy,
        n=int(x.shape[0]),
        attacks=e.results,
        probes=e.probes,
        worst_correct=e.worst,
        stochastic=e.stochastic,
        gradient_zero_fraction=e.gradient[0],
        gradient_nan_fraction=e.gradient[1],
        checks=check_list,
        verdict=checks.verdict(
            check_list, reference_accuracy, settings.checks.robust_threshold, enabled=settings.enabled
        ),
        reference_eps=reference_eps(threat),
        evidence=checks.evidence([k for k, a in e.named.items() if is_white_box_gradient(a)]),
        follow_ups=e.follow_ups,
        newly_broken=e.added,
    )
