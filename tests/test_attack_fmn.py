"""FMN: the true minimum on a model with a closed-form answer, verified norms, and the worst case."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from robustcnn.attacks import FMN, PGD, build_attack
from robustcnn.attacks.context import PerturbContext
from robustcnn.attacks.contract import AttackInvariantError
from robustcnn.errors import ConfigError
from robustcnn.evaluation.battery import BatterySettings, run_battery
from robustcnn.threat import ThreatModel
from robustcnn.tracking.records import battery_metric_rows

DUAL = {"linf": 1.0, "l2": 2.0}  # the dual norm's p: the distance to a hyperplane is |score| / ||w||_dual


class Affine(nn.Module):
    """Class 1 where w.x + b > 0, else class 0: the distance to the boundary is |w.x + b| / ||w||_dual."""

    def __init__(self, w: Tensor, b: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def score(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.w.flatten() + self.b

    def forward(self, x: Tensor) -> Tensor:
        s = self.score(x)
        return torch.stack([torch.zeros_like(s), s], 1)


def affine_case(
    n: int = 16, side: int = 4, scores: tuple[float, float] = (0.1, 1.2)
) -> tuple[Affine, Tensor, Tensor]:
    """Images in [0.2, 0.8] of class 0 whose scores w.x lie in -[scores]: no bound is ever reached.

    (At 4 x 4 the largest L-inf distance is 1.2 / ||w||_1 < 0.1, and every L2 step per pixel stays
    below it.)
    """
    torch.manual_seed(0)
    w = torch.randn(1, side, side)
    model = Affine(w)
    x = 0.5 + 0.05 * torch.randn(n, 1, side, side)
    wanted = -scores[0] - (scores[1] - scores[0]) * torch.rand(n)
    x = x + ((wanted - model.score(x).detach()) / w.flatten().norm() ** 2).view(-1, 1, 1, 1) * w
    assert 0.2 < float(x.min()) and float(x.max()) < 0.8
    return model, x, torch.zeros(n, dtype=torch.long)


def linf_distances(model: Affine, x: Tensor) -> Tensor:
    return (-model.score(x).detach()) / model.w.detach().flatten().norm(p=1)


def noise_proof_case() -> tuple[Affine, Tensor, Tensor, float]:
    """256 pixels, all samples between 1/2 and 1 times the largest distance, and that distance * 1.01.

    Why: the battery always adds the random-noise floor; a random sign perturbation moves the score
    by about eps * ||w||_2, far less than the eps * ||w||_1 / 2 this case needs (> 6 sigma), so only
    the attacks under test can break a sample.
    """
    model, x, y = affine_case(16, side=16, scores=(0.6, 1.2))
    return model, x, y, float(linf_distances(model, x).max()) * 1.01


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fmn_finds_the_closed_form_minimum_of_an_affine_model(norm: str) -> None:
    model, x, y = affine_case()
    true = (-model.score(x).detach()) / model.w.detach().flatten().norm(p=DUAL[norm])
    ordered = true.sort().values
    eps = (0.0, float(ordered[7] + ordered[8]) / 2, float(ordered[-1]) * 1.01)  # no sample on an eps
    result = FMN(steps=100).run(model, x, y, ThreatModel(norm=norm, eps=eps))
    assert result.min_norms is not None
    # never below the true minimum (it is verified adversarial), and within 1% above it
    assert bool((result.min_norms >= true * (1 - 1e-4)).all())
    assert bool((result.min_norms <= true * 1.01).all()), (result.min_norms / true).max()
    # every eps is answered from the search: broken exactly where the minimal norm fits in the ball
    expected = result.min_norms.view(1, -1) > torch.tensor(eps).view(-1, 1)
    assert torch.equal(result.correct, expected)
    assert torch.equal(result.minimal_norms(), result.min_norms)


@pytest.mark.parametrize("threat", [ThreatModel(norm="linf", eps=(0.0, 0.05, 0.1, 0.3)),
                                    ThreatModel(norm="l2", eps=(0.0, 0.5, 1.0, 3.0))], ids=["linf", "l2"])
def test_fmn_minimal_norms_lie_within_the_threat_bound(trained_lenet, mnist_small, threat) -> None:
    x, y = mnist_small.x_test[:24], mnist_small.y_test[:24]
    result = FMN(steps=30).run(trained_lenet, x, y, threat)
    norms = result.min_norms
    assert norms is not None and norms.shape == (24,)
    # 0 where the model is wrong on clean input; otherwise a finite norm no larger than any image allows
    largest = 1.0 if threat.norm == "linf" else math.sqrt(x[0].numel())
    assert bool((norms[~result.clean_correct] == 0).all())
    assert bool(((norms[result.clean_correct] > 0) & (norms[result.clean_correct] <= largest)).all())
    # every reported example lies in its eps ball, and a sample whose minimal norm fits is broken there
    radii = torch.tensor(threat.eps).view(-1, 1)
    assert bool((result.norms <= radii * (1 + 1e-5) + 1e-6).all())
    assert not bool((result.correct & (norms.view(1, -1) <= radii)).any())
    assert float(result.adv_examples.min()) >= 0.0 and float(result.adv_examples.max()) <= 1.0


class Unverified(FMN):
    """A search that claims examples that do not fool the model: the base must not count them."""

    def search_smallest(self, model, x, y, threat, targets, ctx: PerturbContext) -> Tensor:  # type: ignore[no-untyped-def]
        return (x + 1e-3).clamp(0, 1)


class OutOfBounds(FMN):
    def search_smallest(self, model, x, y, threat, targets, ctx: PerturbContext) -> Tensor:  # type: ignore[no-untyped-def]
        return x + 2.0


def test_the_base_verifies_the_search() -> None:
    model, x, y = affine_case(8)
    threat = ThreatModel(norm="linf", eps=(0.0, 0.3))
    result = Unverified(steps=1).run(model, x, y, threat)
    assert result.min_norms is not None and bool(torch.isinf(result.min_norms).all())
    assert bool(result.correct.all())
    with pytest.raises(AttackInvariantError, match="left the input bounds"):
        OutOfBounds(steps=1).run(model, x, y, threat)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"loss": "ce"}, "boundary"),
        ({"steps": 0}, "steps=0"),
        ({"gamma": 1.5}, "gamma"),
        ({"final_step_size": 2.0}, "final_step_size"),
    ],
)
def test_bad_fmn_settings_are_refused(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_attack({"name": "fmn", **spec})


class EvenOnlyFMN(FMN):
    """FMN that searches only the even samples (the odd ones keep their clean input: not found)."""

    def search_smallest(self, model, x, y, threat, targets, ctx: PerturbContext) -> Tensor:  # type: ignore[no-untyped-def]
        found = super().search_smallest(model, x, y, threat, targets, ctx)
        odd = (ctx.active % 2 == 1).view(-1, 1, 1, 1)
        return torch.where(odd, x, found)


class OddOnlyPGD(PGD):
    """PGD that attacks only the odd samples (the even ones are returned clean).

    It changes what PGD returns after PGD vouched for its logits, so it must not vouch.
    """

    reuse_vouched_logits = False

    def perturb(self, model, x, y, eps, threat, targets, ctx: PerturbContext) -> Tensor:  # type: ignore[no-untyped-def]
        found = super().perturb(model, x, y, eps, threat, targets, ctx)
        even = (ctx.active % 2 == 0).view(-1, 1, 1, 1)
        return torch.where(even, x, found)


def test_worst_case_is_the_per_sample_minimum_over_fmn_and_fixed_eps_attacks() -> None:
    """Each attack alone leaves half the samples robust; together they break every one."""
    model, x, y, eps = noise_proof_case()
    threat = ThreatModel(norm="linf", eps=(0.0, eps))
    fmn, pgd = EvenOnlyFMN(steps=50), OddOnlyPGD(steps=20, loss="margin")
    settings = BatterySettings(enabled=False)
    alone = {
        name: run_battery(model, x, y, threat, [attack], undefended=True, settings=settings)
        for name, attack in (("fmn", fmn), ("pgd", pgd))
    }
    assert [r.worst_case_robust_accuracy() for r in alone.values()] == [[1.0, 0.5], [1.0, 0.5]]
    both = run_battery(model, x, y, threat, [fmn, pgd], undefended=True, settings=settings)
    assert both.worst_case_robust_accuracy() == [1.0, 0.0]
    summary = both.to_dict()["minimal_perturbation"]
    # the odd samples' minimal norms come from PGD's reported examples, the even ones' from FMN
    assert summary["unbroken_fraction"] == 0.0 and summary["attacks"] == ["fmn"]
    assert alone["fmn"].to_dict()["minimal_perturbation"]["unbroken_fraction"] == 0.5
    assert alone["fmn"].to_dict()["minimal_perturbation"]["q3"] is None  # falls on an unbroken sample
    assert alone["pgd"].to_dict()["minimal_perturbation"] is None  # no minimum-norm attack ran
    logged = {name: value for name, value, _ in battery_metric_rows(both.to_dict())}
    assert logged["minimal_perturbation/median"] == summary["median"] > 0


def test_fmn_speaks_for_every_eps_where_it_ran_at_some() -> None:
    """Run at the probe eps only, FMN's verified minimal norms still count at every other eps."""
    model, x, y, eps = noise_proof_case()
    ordered = linf_distances(model, x).sort().values
    middle = float(ordered[7] + ordered[8]) / 2
    threat = ThreatModel(norm="linf", eps=(0.0, middle, eps))
    settings = BatterySettings(enabled=False)
    result = run_battery(
        model, x, y, threat, [FMN(steps=50)], undefended=True, settings=settings, reference_only=["fmn"]
    )
    assert result.attacks["fmn"].eps == (eps,)
    norms = result.attacks["fmn"].min_norms
    assert norms is not None
    expected = [float((norms > e).float().mean()) for e in threat.eps]
    assert result.worst_case_robust_accuracy() == expected
    assert 0.0 < expected[1] < 1.0  # samples on both sides of the middle eps: it counted there


def test_foolbox_l2_fmn_projection_is_the_identity() -> None:
    """Why our L2 FMN beats foolbox 3.3.4's (README, benchmarks/attacks.py): its projection is a no-op.

    A point at L2 distance 5 from x0 projected onto the ball of radius 1 must land at distance 1;
    foolbox's `L2FMNAttack.project` returns it unchanged (its factor is `min(1, norms / norms)`).
    If a foolbox release fixes this, the test fails and the README's explanation must go.
    """
    eagerpy = pytest.importorskip("eagerpy")
    foolbox = pytest.importorskip("foolbox")
    x0 = torch.zeros(1, 1, 4, 4)
    x = x0.clone()
    x[0, 0, 0, 0] = 5.0
    projected = foolbox.attacks.L2FMNAttack().project(
        eagerpy.astensor(x), eagerpy.astensor(x0), eagerpy.astensor(torch.ones(1))
    )
    distance = float((projected.raw - x0).flatten().norm())
    assert distance == pytest.approx(5.0), "foolbox's L2 projection now shrinks: update README's FMN note"
    assert distance > 1.0 + 1e-6  # a correct projection onto the radius-1 ball would give 1.0
