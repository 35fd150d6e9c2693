"""The Square attack: it must fool an undefended model without gradients, and keep the base's contract.

One small CNN is trained once per module on 2,000 real MNIST digits (about 2 s on a CPU); every
attack runs on at most 100 test digits with a few hundred queries so the file stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from robustcnn.attacks.result import AttackResult
from robustcnn.attacks.square import Square, p_selection, square_pattern
from robustcnn.data import load_dataset
from robustcnn.errors import ConfigError
from robustcnn.models.classifier import Classifier
from robustcnn.threat import ThreatModel
from robustcnn.training.loop import TrainConfig, fit


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread for this module, restored afterwards.

    The search runs many small tensor ops per query, which a second thread cannot speed up; on a
    shared 2-core runner the two threads' spin-waits made each op up to 100x slower (a 17 s file took
    4-5 minutes), while one thread is as fast on an idle machine and unaffected by a busy one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mnist() -> tuple[Classifier, Tensor, Tensor]:
    """An undefended CNN (about 90% test accuracy) and the first 100 test digits."""
    data = load_dataset("mnist5k", max_train=2000, max_test=200)
    info = data.info
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, info.num_classes),
    )
    model = Classifier(
        net, mean=info.mean, std=info.std, input_shape=info.input_shape, num_classes=info.num_classes
    )
    config = TrainConfig(epochs=6, batch_size=64, lr=3e-3, scheduler="cosine", amp=False)
    fit(model, data.x_train, data.y_train, config, torch.device("cpu"), seed=0, progress=False)
    model.zero_grad(set_to_none=True)  # so a gradient an attack leaves behind would show
    model.eval()
    return model, data.x_test[:100], data.y_test[:100]


def _clean_accuracy(result: AttackResult) -> float:
    return float(result.clean_correct.float().mean())


# -- strength ----------------------------------------------------------------------------------
def test_linf_square_fools_an_undefended_model_and_more_queries_help(
    mnist: tuple[Classifier, Tensor, Tensor],
) -> None:
    model, x, y = mnist
    threat = ThreatModel(norm="linf", eps=(0.2, 0.3))
    few = Square(queries=100, seed=0)(model, x, y, threat)
    many = Square(queries=400, seed=0)(model, x, y, threat)
    assert _clean_accuracy(many) > 0.85
    assert many.robust_accuracy()[-1] < 0.3, many.robust_accuracy()
    for fewer, more in zip(few.robust_accuracy(), many.robust_accuracy(), strict=True):
        assert more <= fewer + 0.03, (few.robust_accuracy(), many.robust_accuracy())
    # a black-box attack: forward passes only, within the budget (1 clean + per eps: queries + 1 check)
    assert many.gradient_passes == 0
    assert many.forward_passes <= x.shape[0] + len(threat.eps) * x.shape[0] * (400 + 1)


def test_l2_square_fools_an_undefended_model_and_more_queries_help(
    mnist: tuple[Classifier, Tensor, Tensor],
) -> None:
    model, x, y = mnist
    threat = ThreatModel(norm="l2", eps=(3.0,))
    few = Square(queries=100, seed=0)(model, x, y, threat)
    many = Square(queries=500, seed=0)(model, x, y, threat)
    assert many.robust_accuracy()[0] < 0.35, many.robust_accuracy()
    assert many.robust_accuracy()[0] <= few.robust_accuracy()[0] + 0.03
    assert float(many.norms.max()) <= 3.0 * (1 + 1e-5)


def test_targeted_square_reaches_the_target(mnist: tuple[Classifier, Tensor, Tensor]) -> None:
    model, x, y = mnist
    x, y = x[:40], y[:40]
    threat = ThreatModel(norm="linf", eps=(0.3,), targeted=True, target="fixed", target_class=3)
    result = Square(queries=200, seed=0, keep_examples=40)(model, x, y, threat)
    hit = result.success[0] & result.clean_correct & (y != 3)
    assert int(hit.sum()) >= 5, result.success_rate()
    with torch.no_grad():
        pred = model(result.adv_examples[0]).argmax(1)
    assert bool((pred[result.success[0]] == 3).all()), "a targeted success must predict the target"


# -- the base's contract -----------------------------------------------------------------------
@pytest.mark.parametrize("norm, eps", [("linf", 0.3), ("l2", 2.0)])
def test_square_keeps_the_invariants(mnist: tuple[Classifier, Tensor, Tensor], norm: str, eps: float) -> None:
    model, x, y = mnist
    x, y = x[:32], y[:32]
    model.train()  # the attack must evaluate in eval mode and hand the model back as it got it
    try:
        # the base raises AttackInvariantError on any candidate outside the ball or [0, 1]
        result = Square(queries=60, seed=1, keep_examples=32)(model, x, y, ThreatModel(norm=norm, eps=(eps,)))
        assert model.training
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert float(result.norms.max()) <= eps * (1 + 1e-5)
    adv = result.adv_examples[0]
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    attacked = result.clean_correct
    assert bool((result.norms[0][attacked] > 0).all()), "every attacked sample reports a perturbed point"


def test_queries_are_counted_per_sample_restart_and_eps(mnist: tuple[Classifier, Tensor, Tensor]) -> None:
    model, x, y = mnist
    x, y = x[:16], y[:16]
    threat = ThreatModel(norm="l2", eps=(0.5, 1.0))
    # the plain computation queries every attacked sample for the whole budget of every restart
    result = Square(queries=7, restarts=2, loss="ce", early_stop=False, seed=0)(model, x, y, threat)
    attacked = int(result.clean_correct.sum())
    assert result.forward_passes == x.shape[0] + len(threat.eps) * attacked * (7 * 2 + 1)


@pytest.mark.parametrize("norm, eps", [("linf", (0.2, 0.3)), ("l2", (2.0, 3.0))])
def test_square_is_deterministic_and_early_stop_changes_nothing(
    mnist: tuple[Classifier, Tensor, Tensor], norm: str, eps: tuple[float, ...]
) -> None:
    model, x, y = mnist
    x, y = x[:32], y[:32]
    threat = ThreatModel(norm=norm, eps=eps)
    first = Square(queries=60, seed=5, keep_examples=32)(model, x, y, threat)
    again = Square(queries=60, seed=5, keep_examples=32)(model, x, y, threat)
    plain = Square(queries=60, seed=5, keep_examples=32, early_stop=False)(model, x, y, threat)
    assert torch.equal(first.success, again.success) and torch.equal(first.adv_examples, again.adv_examples)
    assert torch.equal(first.success, plain.success)
    assert torch.equal(first.norms, plain.norms)
    assert torch.equal(first.adv_examples, plain.adv_examples)
    assert plain.forward_passes > first.forward_passes, "early_stop must save queries"
    other = Square(queries=60, seed=6, keep_examples=32)(model, x, y, threat)
    assert not torch.equal(first.adv_examples, other.adv_examples), "the seed must drive the search"


# -- pieces and settings -----------------------------------------------------------------------
def test_square_size_schedule_follows_the_paper() -> None:
    # the reference's breakpoints, on its 10,000-iteration scale and rescaled to a small budget
    assert p_selection(0.8, 0, 10_000) == 0.8
    assert p_selection(0.8, 10, 10_000) == 0.8
    assert p_selection(0.8, 11, 10_000) == 0.4
    assert p_selection(0.8, 500, 10_000) == 0.1
    assert p_selection(0.8, 9_999, 10_000) == 0.8 / 512
    assert p_selection(0.8, 5, 100) == 0.8 / 8  # 5/100 of the way = iteration 500 of 10,000
    values = [p_selection(0.5, i, 999) for i in range(999)]
    assert values == sorted(values, reverse=True)


def _reference_pattern(s: int) -> Tensor:
    """The paper's ``meta_pseudo_gaussian_pert`` loop, ported literally (without the random transpose)."""

    def rectangles(rows: int, cols: int) -> Tensor:
        delta = torch.zeros(rows, cols, dtype=torch.float64)
        rc, cc = rows // 2 + 1, cols // 2 + 1
        r0, c0 = rc - 1, cc - 1
        for k in range(max(rc, cc)):
            r_end, c_end = min(r0 + 2 * k + 1, rows), min(c0 + 2 * k + 1, cols)
            delta[max(r0, 0) : r_end, max(c0, 0) : c_end] += 1.0 / (k + 1) ** 2
            r0, c0 = r0 - 1, c0 - 1
        return delta / delta.norm() if rows else delta

    delta = torch.cat([rectangles(s // 2, s), -rectangles(s - s // 2, s)])
    return delta / delta.norm()


@pytest.mark.parametrize("s", [1, 2, 3, 5, 6, 13, 25])
def test_l2_update_pattern_matches_the_reference(s: int) -> None:
    pattern = square_pattern(s)
    assert pattern.shape == (s, s)
    assert math.isclose(float(pattern.norm()), 1.0, rel_tol=1e-6)
    assert torch.allclose(pattern.double(), _reference_pattern(s), atol=1e-6)


def test_square_settings_are_validated_and_logged() -> None:
    for bad in (
        {"queries": 0},
        {"queries": 2.5},
        {"p_init": 0.0},
        {"p_init": 1.5},
        {"loss": "l1"},
        {"restarts": 0},
        {"batch_size": 0},
    ):
        with pytest.raises(ConfigError):
            Square(**bad)  # type: ignore[arg-type]
    attack = Square(queries=50, p_init=0.3, loss="ce", restarts=2, seed=4)
    assert not attack.uses_gradients and attack.name == "square"
    params = attack.params()
    assert {"queries": 50, "p_init": 0.3, "loss": "ce", "restarts": 2, "seed": 4}.items() <= params.items()
    assert "queries=50" in repr(attack)


def test_square_rejects_inputs_that_are_not_images() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x = torch.rand(4, 6)
    with torch.no_grad():
        y = model(x).argmax(1)  # correctly classified, so the attack does run
    with pytest.raises(ConfigError, match="images"):
        Square(queries=5)(model, x, y, ThreatModel(norm="linf", eps=(0.1,)))
