"""AutoAttack-strength defaults (issue 18, item 3): APGD-CE then APGD-T in every classifier default,
PGD-EOT for a stochastic model, and probe and Square budgets spent where they change the answer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robustcnn.attacks import APGD, APGDT, FGSM, PGD, AttackResult, Square, attack_specs, build_attack
from robustcnn.config import compose, config_groups
from robustcnn.errors import ConfigError
from robustcnn.evaluation.battery import near_boundary, reference_attack, select_attacks, worst_case
from robustcnn.evaluation.checks import CheckSettings
from robustcnn.evaluation.judge import effort_check
from robustcnn.jobs.inputs import to_container
from robustcnn.threat import ThreatModel

#: Every classifier preset (the face presets run no classifier attacks).
PRESETS = sorted(
    name for name in config_groups()["experiment"] if compose([f"experiment={name}"]).task == "classify"
)


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_every_classifier_default_pairs_apgd_ce_with_apgd_t(preset: str | None) -> None:
    """`robustcnn run` (and each classifier preset) attacks with APGD and APGD-T (the old default:
    fgsm and pgd only, which reported adversarially trained models 2-5 points too robust)."""
    config = to_container(compose([f"experiment={preset}"] if preset else []))
    specs = {spec["name"]: spec for spec in attack_specs(config["attack"])}
    assert {"apgd", "apgd_t"} <= set(specs), sorted(specs)
    assert specs["apgd_t"]["loss"] == "dlr" and specs["apgd_t"]["target_classes"] >= 1
    if preset not in ("mnist_defenses", "regularisation"):  # sweeps that keep APGD on the margin loss
        assert specs["apgd"]["loss"] == "ce", "AutoAttack's pairing: cross-entropy, then targeted DLR"


class Recording(APGDT):
    """APGD-T that records the class each restart aims at."""

    aims: list[Tensor]

    def begin(self, model: nn.Module, x: Tensor, y: Tensor, targets: Any, aim: Any, *rest: Any) -> Any:
        self.aims.append(aim if aim is None else aim.clone())
        return super().begin(model, x, y, targets, aim, *rest)


def test_apgd_t_aims_at_the_top_classes_in_turn_and_counts_any_wrong_class(
    trained_lenet, mnist_small
) -> None:
    x, y = mnist_small.x_test[:32], mnist_small.y_test[:32]
    attack = Recording(target_classes=3, steps=3, seed=0)
    attack.aims = []
    # a radius too small to fool anything: every restart runs on every sample, the full budget
    result = attack.run(trained_lenet, x, y, ThreatModel(norm="linf", eps=(1e-4,)))
    with torch.no_grad():
        ranked = trained_lenet(x).argsort(1, descending=True)
    correct = ranked[:, 0] == y
    assert len(attack.aims) == 3
    for k, aim in enumerate(attack.aims, start=1):
        assert torch.equal(aim, ranked[correct, k]), f"restart {k} aims at the class ranked {k + 1}"
    assert result.gradient_passes == int(correct.sum()) * 3 * 3
    # untargeted success: a sample fooled into any class counts, at eps 0.3 nearly all are
    broken = build_attack({"name": "apgd_t", "target_classes": 2, "steps": 10}).run(
        trained_lenet, x, y, ThreatModel(norm="linf", eps=(0.3,))
    )
    assert broken.robust_accuracy()[0] <= 0.04
    # a targeted threat's target is the aim already: one run per restart, towards it
    targeted = ThreatModel(norm="linf", eps=(1e-4,), targeted=True, target="random")
    attack.aims = []
    attack.run(trained_lenet, x, y, targeted)
    assert len(attack.aims) == 1


def test_a_stochastic_model_gets_pgd_eot_when_only_apgd_was_selected() -> None:
    chosen = [FGSM(), APGD(), APGDT()]
    named = select_attacks(chosen, stochastic=True, eot_samples=4, batch_size=64)
    assert named["eot_pgd"].eot_samples == 4 and type(named["eot_pgd"]) is PGD
    reference = reference_attack(named, stochastic=True)
    assert reference is not None and reference[0] == "eot_pgd", "APGD's step rule stalls on noise"
    assert "eot_pgd" not in select_attacks(chosen, stochastic=False, eot_samples=4, batch_size=64)
    with_pgd = select_attacks([APGD(), PGD()], stochastic=True, eot_samples=4, batch_size=64)
    assert "eot_pgd_2" not in with_pgd and "eot_pgd" in with_pgd, "the selected PGD gets its EOT copy only"
    deterministic = reference_attack(select_attacks(chosen, False, 4, 64), stochastic=False)
    assert deterministic is not None and deterministic[0] == "apgd"


THREAT = ThreatModel(norm="linf", eps=(0.0, 0.3), reference_eps=0.3)


def result(
    name: str, correct: list[list[int]], prob: list[list[float]], rows: list[int] | None = None
) -> AttackResult:
    """An attack's result on len(correct[0]) samples at THREAT's two eps."""
    right = torch.tensor(correct, dtype=torch.bool)
    n = right.shape[1]
    return AttackResult(
        name=name,
        threat=THREAT,
        params={},
        clean_correct=right[0].clone(),
        success=~right,
        correct=right,
        norms=torch.zeros(2, n),
        true_prob_clean=torch.ones(n),
        true_prob_adv=torch.tensor(prob),
        clean_examples=torch.empty(0),
        adv_examples=torch.empty(0),
        rows=None if rows is None else torch.tensor(rows),
    )


def test_the_strong_probe_takes_the_robust_samples_nearest_the_boundary_and_counts_there() -> None:
    results = {
        "fgsm": result("fgsm", [[1, 1, 1, 1, 1, 0]] * 2, [[1.0] * 6, [0.9, 0.5, 0.8, 0.3, 0.6, 0.1]]),
        "apgd": result("apgd", [[1] * 6, [1, 1, 0, 1, 1, 0]], [[1.0] * 6, [0.95, 0.7, 0.2, 0.9, 0.4, 0.1]]),
    }
    worst = worst_case(THREAT, results, {})
    # robust at 0.3: samples 0, 1, 3, 4; nearest the boundary (lowest true-class probability): 3, 4, 1
    assert near_boundary(results, THREAT, worst, 3).tolist() == [1, 3, 4]
    # fewer robust than asked: only those (more effort cannot lower a sample already broken)
    assert near_boundary(results, THREAT, worst, 6).tolist() == [0, 1, 3, 4]
    strong = result("apgd_strong", [[1, 1, 1], [1, 0, 1]], [[1.0] * 3, [0.6, 0.2, 0.5]], rows=[1, 3, 4])
    probes = {"apgd_strong": strong}
    assert worst_case(THREAT, results, probes)[1].tolist() == [True, True, False, False, True, False]
    check = effort_check(results, strong, "apgd", THREAT.eps, CheckSettings(tolerance=0.1), False)
    # judged on all 6 samples: apgd 4/6, with the one the stronger run broke 3/6 -> gains 1/6 > 0.1
    assert check.passed is False and "exceeds apgd with more steps/restarts by" in check.detail, check
    assert effort_check(results, strong, "apgd", THREAT.eps, CheckSettings(tolerance=0.2), False).passed


def test_square_gives_up_the_samples_it_cannot_move_at_no_loss(trained_lenet, mnist_small) -> None:
    x, y = mnist_small.x_test[:16], mnist_small.y_test[:16]
    tiny = ThreatModel(norm="linf", eps=(0.01,))  # far too small to cross the boundary in 80 queries
    full = Square(queries=80, seed=0).run(trained_lenet, x, y, tiny)
    stopped = Square(queries=80, progress_window=10, seed=0).run(trained_lenet, x, y, tiny)
    assert stopped.robust_accuracy() == full.robust_accuracy()
    assert stopped.forward_passes < full.forward_passes / 2, (stopped.forward_passes, full.forward_passes)
    with pytest.raises(ConfigError, match="progress_window needs loss=margin"):
        Square(progress_window=10, loss="ce")
