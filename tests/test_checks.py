"""Every sanity check can fail: one crafted case per check, next to a sound evaluation where all pass.

Each row of ``BREAKERS`` names a check, builds the model / attacks / settings that break it, and
the detail the failure must give. The cases are real batteries on the session's trained lenet5
(64 images, short attacks), so each check is shown failing on the evidence it is computed from,
not on numbers fed to it by hand.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robustcnn.attacks import FGSM, PGD, Transfer, build_attack
from robustcnn.attacks import batches as attack_batches
from robustcnn.evaluation import checks
from robustcnn.evaluation.battery import BatterySettings, run_battery
from robustcnn.models import Classifier, build_model, set_inference_dropout
from robustcnn.threat import ThreatModel
from robustcnn.tracking.records import battery_metric_rows

THREAT = ThreatModel(norm="linf", eps=(0.0, 0.1, 0.2, 0.3), reference_eps=0.3)
FAST = BatterySettings(probe_samples=32, monotone_samples=32, monotone_steps=5, eot_samples=4)
N = 64
SOUND_THREAT = ThreatModel(norm="linf", eps=(0.0, 0.1, 0.2, 0.3), reference_eps=0.1)


class NoOp(PGD):
    """A PGD that never moves: the broken attack that makes a model look robust."""

    def perturb(self, model: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x.clone()


class GivesUpAtLargeEps(PGD):
    """A PGD that stops attacking from eps 0.2 on: weaker at a larger eps (Carlini et al.'s sign)."""

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, *rest: Any) -> Tensor:
        if eps >= 0.2:
            return x.clone()
        return super().perturb(model, x, y, eps, *rest)


class LeavesTheBall(PGD):
    """An attack whose examples lie at twice eps; with the base's projection broken they are reported."""

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float, *args: Any, **kwargs: Any
    ) -> Tensor:
        return x + 2 * eps

    def check_candidate(self, *args: Any, **kwargs: Any) -> None:
        return None


class MaskedGradients(nn.Module):
    """Input quantisation: the output is piecewise constant, every input gradient is zero."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(torch.round(x * 4) / 4)


@dataclass
class Case:
    """A battery to run: the model (given the trained lenet5), attacks, settings, and what else it needs."""

    attacks: Callable[[nn.Module], list[Any]]
    model: Callable[[nn.Module], nn.Module] = lambda net: net
    settings: BatterySettings = FAST
    undefended: bool = True
    patch: dict[str, Any] = field(default_factory=dict)  # attribute of attacks/batches.py -> replacement
    threat: ThreatModel = THREAT
    #: attacks run last, on the samples the others left correct (the audit's square and noise)
    survivors_only: tuple[str, ...] = ()


def with_transfer(target: nn.Module) -> Transfer:
    """A transfer attack whose surrogate is the target itself (as strong as a white-box PGD)."""
    return Transfer(steps=10).bind(target)


def masked(net: nn.Module) -> nn.Module:
    return Classifier(MaskedGradients(net), mean=[0.0], std=[1.0], input_shape=(1, 28, 28), num_classes=10)


def stochastic(net: nn.Module) -> nn.Module:
    """The lenet5 with dropout kept on at inference: a randomised model."""
    model = build_model(
        "lenet5", input_shape=(1, 28, 28), num_classes=10, mean=[0.1307], std=[0.3081], dropout=0.3
    )
    model.load_state_dict(copy.deepcopy(net.state_dict()))
    set_inference_dropout(model.eval(), True)
    return model


SQUARE = {"name": "square", "queries": 100}

#: check -> (the case that breaks it, a phrase its failure detail must contain)
BREAKERS: dict[str, tuple[Case, str]] = {
    "monotone_in_eps": (Case(lambda net: [GivesUpAtLargeEps(steps=10)]), "pgd_per_eps rises by"),
    "zero_at_largest_eps_undefended": (Case(lambda net: [NoOp(steps=5)]), "at eps 0.3 (must be <= 0.05)"),
    "zero_at_unbounded_eps": (Case(lambda net: [NoOp(steps=5)]), "at eps 1 (must be <= 0.05)"),
    "iterative_beats_single_step": (
        Case(lambda net: [FGSM(), PGD(steps=2, step_size=0.001, random_start=False)]),
        "pgd accuracy exceeds fgsm by",
    ),
    "more_effort_no_gain": (
        Case(lambda net: [PGD(steps=2, step_size=0.02, random_start=False)]),
        "pgd accuracy exceeds pgd with more steps/restarts by",
    ),
    "white_box_beats_noise": (Case(lambda net: [NoOp(steps=5)]), "exceeds noise by"),
    "white_box_beats_square": (
        Case(lambda net: [NoOp(steps=5), build_attack(SQUARE, {"seed": 0})]),
        "exceeds square by",
    ),
    "white_box_beats_transfer": (
        Case(lambda net: [NoOp(steps=5), with_transfer(net)]),
        "exceeds transfer by",
    ),
    "gradients_nonzero_finite": (Case(lambda net: [PGD(steps=5)], model=masked), "all-zero gradient"),
    "stochastic_model_eot": (
        Case(
            lambda net: [PGD(steps=5)],
            model=stochastic,
            settings=BatterySettings(probe_samples=32, monotone_samples=32, monotone_steps=5, eot_samples=1),
            undefended=False,
        ),
        "averages its gradient over more than one draw",
    ),
    "perturbations_within_threat_model": (
        Case(lambda net: [LeavesTheBall(steps=5)], patch={"project": lambda raw, *rest: raw}),
        "pgd: norm exceeds eps by 3.00e-01",
    ),
}


def run_case(case: Case, net: nn.Module, data: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    for name, replacement in case.patch.items():
        monkeypatch.setattr(attack_batches, name, replacement)
    model = case.model(net)
    x, y = data.x_test[:N], data.y_test[:N]
    battery = run_battery(
        model,
        x,
        y,
        case.threat,
        case.attacks(model),
        undefended=case.undefended,
        settings=case.settings,
        survivors_only=case.survivors_only,
    )
    return battery.to_dict()


def test_every_check_has_a_case_that_breaks_it() -> None:
    """A new check must come with its crafted case (the enforced invariants need none: nothing can fail)."""
    judged = {"monotone_in_eps", "zero_at_largest_eps_undefended", "zero_at_unbounded_eps"}
    assert judged <= set(BREAKERS)
    assert len(BREAKERS) == 11


@pytest.mark.parametrize("check", sorted(BREAKERS))
def test_each_check_fails_on_its_crafted_case(
    check: str, trained_lenet: nn.Module, mnist_small: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    case, phrase = BREAKERS[check]
    results = run_case(case, trained_lenet, mnist_small, monkeypatch)
    by_name = {c["name"]: c for c in results["checks"]}
    assert by_name[check]["passed"] is False and by_name[check]["status"] == "failed", by_name[check]
    assert phrase in by_name[check]["detail"], by_name[check]["detail"]
    assert results["verdict"] == "unreliable"


def test_a_sound_evaluation_passes_every_check(
    trained_lenet: nn.Module, mnist_small: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every attack a check compares, on an undefended model: each check runs and passes.

    Judged at eps 0.1, where the undefended lenet keeps most samples: at 0.3 none survives, and the
    effort check (more steps on the samples the attacks left robust) has nothing to probe (skipped).
    """
    sound = Case(
        lambda net: [FGSM(), PGD(steps=10), build_attack(SQUARE, {"seed": 0}), with_transfer(net)],
        threat=SOUND_THREAT,
    )
    results = run_case(sound, trained_lenet, mnist_small, monkeypatch)
    statuses = {c["name"]: c["status"] for c in results["checks"]}
    assert {name: statuses[name] for name in BREAKERS} == dict.fromkeys(BREAKERS, "passed"), results["checks"]
    strong = results["probes"]["pgd_strong"]
    assert (strong["params"]["steps"], strong["params"]["restarts"], strong["params"]["seed"]) == (
        25,
        2,
        1,
    ), "2.5x steps, +1 restart, seed+1"
    assert strong["samples"] == "robust_near_boundary" and strong["n"] <= FAST.probe_samples
    enforced = {name for name, status in statuses.items() if status == "enforced"}
    assert "reported_curves_monotone_in_eps" in enforced, "the base's propagation is no pass"
    assert all(c["passed"] is None for c in results["checks"] if c["status"] == "enforced")
    assert results["verdict"] == "robust" and results["evidence"] == "white_box"
    logged = {name for name, _, _ in battery_metric_rows(results)}
    assert "check/monotone_in_eps" in logged and "check/reported_curves_monotone_in_eps" not in logged


def test_monotone_in_eps_is_judged_on_independent_runs_not_the_reported_curve(
    trained_lenet: nn.Module, mnist_small: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported curve of the attack that gives up stays monotone (the base carries first
    successes), so only the per-eps probe can show it: the old check, on the curves, passed it."""
    case, _ = BREAKERS["monotone_in_eps"]
    results = run_case(case, trained_lenet, mnist_small, monkeypatch)
    reported = results["robust_accuracy"]["pgd"]
    assert all(b <= a for a, b in zip(reported, reported[1:], strict=False)), reported
    probe = results["probes"]["pgd_per_eps"]["robust_accuracy"]
    assert probe[2] > probe[1] + 0.1, probe


def test_checks_off_give_no_verdict(trained_lenet: nn.Module, mnist_small: Any) -> None:
    """checks.enabled=false: no checks, no probes, verdict ``unchecked`` (never robust)."""
    settings = BatterySettings.from_mapping({"enabled": False})
    x, y = mnist_small.x_test[:32], mnist_small.y_test[:32]
    battery = run_battery(trained_lenet, x, y, THREAT, [NoOp(steps=2)], undefended=False, settings=settings)
    assert battery.verdict == "unchecked" and not battery.checks and not battery.probes
    assert checks.verdict([], 1.0, 0.5, enabled=False) == "unchecked"


def test_black_box_only_evidence_skips_the_gradient_checks(
    trained_lenet: nn.Module, mnist_small: Any
) -> None:
    """Square alone: evidence black_box, and the EOT check is skipped (no gradient attack ran), not passed."""
    x, y = mnist_small.x_test[:32], mnist_small.y_test[:32]
    square = build_attack({"name": "square", "queries": 20}, {"seed": 0})
    battery = run_battery(trained_lenet, x, y, THREAT, [square], undefended=False, settings=FAST)
    by_name = {c.name: c for c in battery.checks}
    assert battery.evidence == "black_box" and battery.to_dict()["evidence"] == "black_box"
    assert by_name["stochastic_model_eot"].status == "skipped", by_name["stochastic_model_eot"]
    assert by_name["gradients_nonzero_finite"].status == "skipped"


def test_an_attack_that_bypasses_the_base_fails_the_threat_check() -> None:
    """Examples no witness saw are not counted as inside the threat model."""
    witness = checks.ThreatWitness("linf", (0.0, 1.0))
    x = torch.zeros(4, 1, 2, 2)
    witness(x, x + 0.1, 0.1)
    assert checks.within_threat({"pgd": witness}, {"pgd": 4}).passed is True
    result = checks.within_threat({"pgd": witness}, {"pgd": 4, "library": 8})
    assert result.passed is False and "library: only 0 of its 8 examples re-measured" in result.detail
    witness(x, x + float("nan"), 0.1)
    assert checks.within_threat({"pgd": witness}, {"pgd": 8}).passed is False, "NaN images are outside"


@pytest.mark.parametrize(
    ("follow_up", "attacks"),
    [
        ("noise", lambda net: [NoOp(steps=5)]),
        ("square", lambda net: [NoOp(steps=5), build_attack(SQUARE, {"seed": 0})]),
    ],
)
def test_a_follow_up_baseline_fails_when_it_breaks_what_gradients_left(
    follow_up: str, attacks: Any, trained_lenet: nn.Module, mnist_small: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run only on the survivors (as the audit runs Square and noise), a baseline that breaks many of
    them fails its check; it attacked only those samples, and what it broke counts in the worst case."""
    case = Case(attacks, survivors_only=("square", "noise"))
    results = run_case(case, trained_lenet, mnist_small, monkeypatch)
    check = {c["name"]: c for c in results["checks"]}[f"white_box_beats_{follow_up}"]
    assert (
        check["status"] == "failed" and "samples the white-box attacks left correct broke" in check["detail"]
    )
    summary = results["follow_ups"][follow_up]
    assert summary["samples"] == "survivors" and follow_up not in results["robust_accuracy"]
    clean_correct = round(results["worst_case_robust_accuracy"][0] * N)
    assert summary["n"] == clean_correct  # the no-op attack broke nothing: every correct sample survived
    assert max(summary["newly_broken"]) > 0.02 * N


def test_follow_ups_attack_only_survivors_and_pass_on_a_sound_run(
    trained_lenet: nn.Module, mnist_small: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a real PGD the follow-ups see only its survivors, break at most the tolerance, and pass."""
    case = Case(
        lambda net: [FGSM(), PGD(steps=10), build_attack(SQUARE, {"seed": 0})],
        threat=SOUND_THREAT,
        survivors_only=("square", "noise"),
    )
    results = run_case(case, trained_lenet, mnist_small, monkeypatch)
    statuses = {c["name"]: c["status"] for c in results["checks"]}
    both = statuses["white_box_beats_square"], statuses["white_box_beats_noise"]
    assert both == ("passed", "passed"), results["checks"]
    survivors = round(min(results["robust_accuracy"]["pgd"][1], results["robust_accuracy"]["fgsm"][1]) * N)
    assert results["follow_ups"]["noise"]["n"] <= survivors < N
    assert results["verdict"] != "unreliable"
