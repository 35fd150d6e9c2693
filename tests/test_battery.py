"""The battery: worst case over attacks, automatic noise/EOT/probes, checks and verdicts."""

from __future__ import annotations

import torch
from torch import nn

from robustcnn.attacks import FGSM, PGD
from robustcnn.evaluation.battery import BatterySettings, is_stochastic, run_battery
from robustcnn.models import Classifier, set_inference_dropout
from robustcnn.threat import ThreatModel

THREAT = ThreatModel(norm="linf", eps=(0.0, 0.1, 0.2, 0.3), reference_eps=0.3)
FAST = BatterySettings(probe_samples=64, monotone_samples=32, monotone_steps=5, eot_samples=4)


def test_undefended_model_is_not_robust_and_checks_pass(trained_lenet, mnist_small) -> None:
    x, y = mnist_small.x_test[:128], mnist_small.y_test[:128]
    pgd = PGD(steps=20)
    before = pgd.settings()
    battery = run_battery(trained_lenet, x, y, THREAT, [FGSM(), pgd], undefended=True, settings=FAST)
    assert pgd.settings() == before and pgd.name == "pgd", "the battery derives its probes, it never edits"
    results = battery.to_dict()
    assert set(results["robust_accuracy"]) == {"fgsm", "pgd", "noise"}, "the noise floor always runs"
    worst = results["worst_case_robust_accuracy"]
    for curve in results["robust_accuracy"].values():
        assert all(w <= c for w, c in zip(worst, curve, strict=True)), "worst case is per-sample over attacks"
    assert worst[-1] <= 0.02
    failed = [c for c in results["checks"] if c["passed"] is False]
    assert not failed, failed
    skipped = {c["name"] for c in results["checks"] if c["passed"] is None}
    assert {"white_box_beats_square", "white_box_beats_transfer"} <= skipped, (
        "checks without their attack skip"
    )
    assert results["verdict"] == "not robust"
    # no sample survived at eps 0.3: the strong probe has nothing to attack, and its check says so
    assert {"pgd_unbounded", "pgd_per_eps"} <= set(results["probes"]) and "pgd_strong" not in results[
        "probes"
    ]
    effort = next(c for c in results["checks"] if c["name"] == "more_effort_no_gain")
    assert effort["status"] == "skipped" and "no sample survived" in effort["detail"], effort
    for key in ("eps", "attack_success_rate", "timing", "checks", "verdict", "perturbation_norm"):
        assert key in results


class MaskedGradients(nn.Module):
    """A network whose output is piecewise constant in the input: zero gradients everywhere.

    The classic obfuscation (input quantisation): gradient attacks fail, noise does not.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantised = x + ((x * 4).round() / 4 - x).detach()  # straight-through-free rounding
        return self.net(quantised).detach() * 1.0 + 0 * quantised.sum()


def test_masked_gradients_make_the_evaluation_unreliable(trained_lenet, mnist_small) -> None:
    masked = Classifier(
        MaskedGradients(trained_lenet), mean=[0.0], std=[1.0], input_shape=(1, 28, 28), num_classes=10
    )
    x, y = mnist_small.x_test[:96], mnist_small.y_test[:96]
    battery = run_battery(masked, x, y, THREAT, [FGSM(), PGD(steps=10)], undefended=True, settings=FAST)
    checks = {c.name: c for c in battery.checks}
    assert checks["gradients_nonzero_finite"].passed is False
    assert battery.verdict == "unreliable"


def test_stochastic_model_is_detected_and_attacked_with_eot(trained_lenet, mnist_small) -> None:
    import copy

    from robustcnn.models import build_model

    info = mnist_small.info
    model = build_model(
        "lenet5", input_shape=info.input_shape, num_classes=10, mean=info.mean, std=info.std, dropout=0.3
    )
    model.load_state_dict(copy.deepcopy(trained_lenet.state_dict()))
    model.eval()
    assert not is_stochastic(model, mnist_small.x_test[:16])
    set_inference_dropout(model, True)
    assert is_stochastic(model, mnist_small.x_test[:16])
    x, y = mnist_small.x_test[:64], mnist_small.y_test[:64]
    pgd = PGD(steps=10)
    battery = run_battery(model, x, y, THREAT, [pgd], undefended=False, settings=FAST)
    assert battery.stochastic and "eot_pgd" in battery.attacks
    assert battery.attacks["eot_pgd"].params["eot_samples"] == FAST.eot_samples
    assert (pgd.name, pgd.eot_samples) == ("pgd", 1), "the EOT variant is derived, the caller's attack kept"
    assert {c.name: c.passed for c in battery.checks}["stochastic_model_eot"] is True


def test_reference_only_attacks_run_at_the_probe_eps_and_count_there(trained_lenet, mnist_small) -> None:
    """Square at the reference and largest eps only: cheaper, still in the worst case and the checks."""
    from robustcnn.attacks import build_attack

    x, y = mnist_small.x_test[:64], mnist_small.y_test[:64]
    square = build_attack({"name": "square", "queries": 50}, {"seed": 0})
    threat = ThreatModel(norm="linf", eps=(0.0, 0.1, 0.2, 0.3), reference_eps=0.2)
    battery = run_battery(
        trained_lenet,
        x,
        y,
        threat,
        [PGD(steps=10), square],
        undefended=True,
        settings=FAST,
        reference_only=["square"],
    )
    assert battery.attacks["square"].eps == (0.2, 0.3)
    results = battery.to_dict()
    curve = results["robust_accuracy"]["square"]
    assert curve[0] is None and curve[1] is None and curve[2] is not None and curve[3] is not None
    worst = results["worst_case_robust_accuracy"]
    assert all(w <= c + 1e-9 for w, c in zip(worst[2:], curve[2:], strict=True))
    check = {c["name"]: c for c in results["checks"]}["white_box_beats_square"]
    assert check["passed"] is True, check
    import json

    json.dumps(results["robust_accuracy"], allow_nan=False)  # None where not run, never NaN
