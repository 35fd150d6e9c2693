"""Every attack honours the contract; PGD is strong; shortcuts never change a number; bad input is refused."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from robustcnn.attacks import (
    FGSM,
    PGD,
    AttackResult,
    RandomNoise,
    Transfer,
    available_attacks,
    build_attack,
    with_eot,
)
from robustcnn.attacks.base import Attack, AttackOptions, constructor_parameters
from robustcnn.attacks.context import PerturbContext
from robustcnn.attacks.contract import AttackInvariantError
from robustcnn.attacks.gradient import GradientAttack, GradientOptions
from robustcnn.attacks.pgd import PGDOptions
from robustcnn.attacks.restarts import Restarts, SampleRows
from robustcnn.errors import ConfigError
from robustcnn.models import build_model
from robustcnn.threat import ThreatModel

LINF = ThreatModel(norm="linf", eps=(0.0, 0.1, 0.3))
L2 = ThreatModel(norm="l2", eps=(0.0, 1.0, 3.0))


def _surrogate(mnist_small) -> nn.Module:
    info = mnist_small.info
    torch.manual_seed(1)
    return build_model(
        "lenet5", input_shape=info.input_shape, num_classes=10, mean=info.mean, std=info.std
    ).eval()


def _attacks(mnist_small) -> dict[str, object]:
    attacks = {
        "fgsm": FGSM(),
        "pgd": PGD(steps=10),
        "pgd_margin_restarts": PGD(steps=5, restarts=2, loss="margin"),
        "apgd": build_attack({"name": "apgd", "steps": 10, "restarts": 2}),
        "apgd_dlr": build_attack({"name": "apgd", "steps": 6, "loss": "dlr"}),
        "fmn": build_attack({"name": "fmn", "steps": 10}),
        "noise": RandomNoise(samples=2),
        "noise_uniform": RandomNoise(kind="uniform", samples=2),
        "transfer": Transfer(steps=5).bind(_surrogate(mnist_small)),
        "eot": build_attack({"name": "eot", "attack": "pgd", "samples": 2, "steps": 3}),
    }
    try:
        attacks["square"] = build_attack({"name": "square", "queries": 30})
    except ConfigError:
        pass
    return attacks


def _check_invariants(result: AttackResult, threat: ThreatModel, n: int) -> None:
    e = len(threat.eps)
    assert result.success.shape == result.correct.shape == result.norms.shape == (e, n)
    assert result.clean_correct.shape == (n,)
    eps = torch.tensor(threat.eps).view(-1, 1)
    assert bool((result.norms <= eps * (1 + 1e-5) + 1e-6).all()), "perturbation outside the eps ball"
    assert float(result.adv_examples.min()) >= 0.0 and float(result.adv_examples.max()) <= 1.0
    # eps 0 is the clean model; a sample fooled at a smaller eps stays fooled (monotone)
    assert torch.equal(result.correct[0], result.clean_correct)
    assert bool((result.success[1:] >= result.success[:-1]).all())
    assert bool((result.correct[1:] <= result.correct[:-1]).all())


@pytest.mark.parametrize("threat", [LINF, L2], ids=["linf", "l2"])
def test_every_attack_keeps_the_invariants(trained_lenet, mnist_small, threat: ThreatModel) -> None:
    x, y = mnist_small.x_test[:48], mnist_small.y_test[:48]
    for name, attack in _attacks(mnist_small).items():
        trained_lenet.train()  # the attack must set eval mode and restore this
        result = attack.run(trained_lenet, x, y, threat)
        assert trained_lenet.training, f"{name} did not restore train mode"
        trained_lenet.eval()
        assert all(p.grad is None for p in trained_lenet.parameters()), f"{name} left parameter gradients"
        assert all(p.requires_grad for p in trained_lenet.parameters()), f"{name} left parameters frozen"
        _check_invariants(result, threat, 48)


def test_base_refuses_an_attack_that_leaves_the_ball(trained_lenet, mnist_small) -> None:
    class Cheat(PGD):
        def perturb(self, model, x, y, eps, threat, targets, ctx: PerturbContext):  # type: ignore[no-untyped-def]
            return (x + 2 * eps).clamp(0, 1)

    with pytest.raises(AttackInvariantError, match="left the linf ball"):
        Cheat().run(trained_lenet, mnist_small.x_test[:8], mnist_small.y_test[:8], LINF)


def test_base_refuses_an_attack_that_touches_parameters(trained_lenet, mnist_small) -> None:
    class Leaky(FGSM):
        def perturb(self, model, x, y, eps, threat, targets, ctx):  # type: ignore[no-untyped-def]
            p = next(model.parameters())
            p.grad = torch.ones_like(p)
            return x

    with pytest.raises(AttackInvariantError, match="gradients"):
        Leaky().run(trained_lenet, mnist_small.x_test[:8], mnist_small.y_test[:8], LINF)
    for p in trained_lenet.parameters():
        p.grad = None


@pytest.mark.slow
def test_pgd_breaks_an_undefended_model(trained_lenet, mnist_small) -> None:
    """Strength, not just that it ran: PGD-40 at eps 0.3 leaves ~0%; FGSM >= PGD; noise far above."""
    x, y = mnist_small.x_test[:500], mnist_small.y_test[:500]
    threat = ThreatModel(norm="linf", eps=(0.0, 0.05, 0.1, 0.2, 0.3))
    pgd = PGD(steps=40).run(trained_lenet, x, y, threat).robust_accuracy()
    fgsm = FGSM().run(trained_lenet, x, y, threat).robust_accuracy()
    noise = RandomNoise().run(trained_lenet, x, y, threat).robust_accuracy()
    assert pgd[0] > 0.95, f"clean accuracy {pgd[0]}"
    assert pgd[-1] <= 0.01, f"PGD-40 at eps 0.3 leaves {pgd[-1]:.3f}"
    assert all(f >= p for f, p in zip(fgsm, pgd, strict=True)), (fgsm, pgd)
    # 8 draws of +-0.3 sign noise do hurt (~50% on this model) but stay far above PGD's ~0%
    assert noise[-1] >= pgd[-1] + 0.3, f"the noise floor should stay far above PGD: {noise} vs {pgd}"
    assert all(n >= p for n, p in zip(noise, pgd, strict=True))


def test_l2_and_targeted_pgd(trained_lenet, mnist_small) -> None:
    x, y = mnist_small.x_test[:200], mnist_small.y_test[:200]
    l2 = PGD(steps=40).run(trained_lenet, x, y, ThreatModel(norm="l2", eps=(0.0, 3.0)))
    assert l2.robust_accuracy()[-1] <= 0.05
    for target, floor in (("random", 0.9), ("least_likely", 0.7)):
        targeted = ThreatModel(norm="linf", eps=(0.0, 0.3), targeted=True, target=target)
        result = PGD(steps=40).run(trained_lenet, x, y, targeted)
        assert result.success_rate()[-1] >= floor, f"targeted PGD ({target}) reaches its target too rarely"
        assert result.robust_accuracy()[-1] <= 0.1 + 1e-6  # 20 of 200 is 0.1 (0.10000000149 in float32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda e: PGD(steps=20, restarts=2, early_stop=e),
        lambda e: RandomNoise(samples=4, early_stop=e),
        lambda e: FGSM(early_stop=e),
        lambda e: build_attack({"name": "apgd", "steps": 20, "restarts": 2, "early_stop": e}),
    ],
    ids=["pgd", "noise", "fgsm", "apgd"],
)
def test_shortcuts_change_no_number(trained_lenet, mnist_small, make) -> None:
    x, y = mnist_small.x_test[:120], mnist_small.y_test[:120]
    threat = ThreatModel(norm="linf", eps=(0.0, 0.05, 0.1, 0.15, 0.3))
    fast, plain = make(True).run(trained_lenet, x, y, threat), make(False).run(trained_lenet, x, y, threat)
    assert torch.equal(fast.success, plain.success)
    assert torch.equal(fast.correct, plain.correct)
    assert torch.allclose(fast.norms, plain.norms, atol=1e-6)
    assert fast.gradient_passes <= plain.gradient_passes


@pytest.mark.slow
@pytest.mark.parametrize(
    "threat",
    [
        ThreatModel(norm="linf", eps=(0.0, 0.05, 0.1, 0.3)),
        ThreatModel(norm="l2", eps=(0.0, 1.0, 3.0)),
        ThreatModel(norm="linf", eps=(0.0, 0.1, 0.3), targeted=True, target="least_likely"),
    ],
    ids=["linf", "l2", "targeted"],
)
def test_vouched_logits_change_no_number(trained_lenet, mnist_small, threat: ThreatModel) -> None:
    """PGD hands the base the logits of its first hits instead of a second forward pass: same numbers."""
    x, y = mnist_small.x_test[:120], mnist_small.y_test[:120]
    for early in (True, False):
        fast = PGD(steps=10, restarts=2, early_stop=early)
        plain = PGD(steps=10, restarts=2, early_stop=early)
        plain.reuse_vouched_logits = False
        a, b = fast.run(trained_lenet, x, y, threat), plain.run(trained_lenet, x, y, threat)
        for field in ("success", "correct", "clean_correct", "adv_examples"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert torch.equal(a.norms, b.norms)
        assert torch.allclose(a.true_prob_adv, b.true_prob_adv, atol=1e-6)
        assert a.gradient_passes == b.gradient_passes
        assert a.forward_passes < b.forward_passes  # the shortcut did save forward passes


def test_same_seed_same_result(trained_lenet, mnist_small) -> None:
    x, y = mnist_small.x_test[:64], mnist_small.y_test[:64]
    a = PGD(steps=5, seed=3).run(trained_lenet, x, y, LINF)
    b = PGD(steps=5, seed=3).run(trained_lenet, x, y, LINF)
    assert torch.equal(a.success, b.success) and torch.equal(a.norms, b.norms)


def test_batching_does_not_change_results(trained_lenet, mnist_small) -> None:
    x, y = mnist_small.x_test[:64], mnist_small.y_test[:64]
    whole = FGSM(batch_size=64).run(trained_lenet, x, y, LINF)
    split = FGSM(batch_size=16).run(trained_lenet, x, y, LINF)
    assert torch.equal(whole.success, split.success)


@pytest.mark.parametrize(
    ("threat_kwargs", "message"),
    [
        ({"eps": (0.0, 1.5)}, "eps"),
        ({"eps": (-0.1,)}, ">= 0"),
        ({"norm": "l1"}, "norm"),
        ({"eps": (0.3, 0.1)}, "ascending"),
        ({"eps": ()}, "empty"),
        ({"eps": (float("nan"),)}, "finite"),
        ({"target": "best"}, "target"),
        ({"targeted": True, "target": "fixed"}, "target_class"),
        ({"eps": (0.0, 0.3), "reference_eps": 0.2}, "reference_eps"),
    ],
)
def test_bad_threat_models_are_refused(threat_kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ThreatModel(**threat_kwargs)


def test_bad_attack_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="steps"):
        PGD(steps=0)
    with pytest.raises(ConfigError, match="loss"):
        PGD(loss="hinge")
    with pytest.raises(ConfigError, match="unknown attack"):
        build_attack({"name": "deepfool"})
    with pytest.raises(ConfigError, match="no setting"):
        build_attack({"name": "pgd", "stepz": 3})
    with pytest.raises(ConfigError, match="backend"):
        build_attack({"name": "pgd", "backend": "foolbox"})


def test_bad_inputs_are_refused_before_work(trained_lenet, mnist_small) -> None:
    x, y = mnist_small.x_test[:8], mnist_small.y_test[:8]
    cases = [
        (x * 255, y, "bounds"),
        (x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y, "NaN"),
        (x, y + 10, "labels"),
        (x, y[:4], "do not match"),
        ((x * 255).to(torch.uint8), y, "floating point"),
        (x[:0], y[:0], "no images"),
    ]
    for xs, ys, message in cases:
        with pytest.raises(ConfigError, match=message):
            FGSM().run(trained_lenet, xs, ys, LINF)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Unflatten(1, (2, 5)))
    with pytest.raises(ConfigError, match="logits"):
        FGSM().run(flat, x, y, LINF)
    with pytest.raises(ConfigError, match="diameter"):
        FGSM().run(trained_lenet, x, y, ThreatModel(norm="l2", eps=(0.0, 50.0)))


def test_apgd_breaks_an_undefended_model_with_every_loss_and_targeted(trained_lenet, mnist_small) -> None:
    """APGD (the audit's main attack): ~0% at eps 0.3 with CE, margin and DLR; targeted reaches targets."""
    from robustcnn.attacks.apgd import checkpoints

    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # the paper's schedule
    x, y = mnist_small.x_test[:300], mnist_small.y_test[:300]
    threat = ThreatModel(norm="linf", eps=(0.0, 0.1, 0.3))
    for loss in ("ce", "margin", "dlr"):
        result = build_attack({"name": "apgd", "steps": 30, "loss": loss}).run(trained_lenet, x, y, threat)
        assert result.robust_accuracy()[-1] <= 0.01, (loss, result.robust_accuracy())
    targeted = ThreatModel(norm="linf", eps=(0.0, 0.3), targeted=True, target="random")
    result = build_attack({"name": "apgd", "steps": 30, "loss": "margin"}).run(trained_lenet, x, y, targeted)
    assert result.success_rate()[-1] >= 0.9


def test_with_derives_a_checked_variant_and_leaves_the_attack_alone() -> None:
    pgd = PGD(steps=10, seed=3, loss="margin")
    before = pgd.settings()
    variant = pgd.with_(steps=25, restarts=2.0, seed=4, name="pgd_strong")
    assert pgd.settings() == before and pgd.name == "pgd", "the original is untouched"
    assert type(variant) is PGD and variant.name == "pgd_strong"
    assert (variant.steps, variant.restarts, variant.seed) == (25, 2, 4)
    assert type(variant.restarts) is int, "values are normalised as a config's are"
    changed = {"steps", "restarts", "seed"}
    assert {k: v for k, v in variant.settings().items() if k not in changed} == {
        k: v for k, v in before.items() if k not in changed
    }
    with pytest.raises(ConfigError, match=r"no setting\(s\) \['queries'\]"):
        pgd.with_(queries=5)
    with pytest.raises(ConfigError, match="steps=0 must be >= 1"):
        pgd.with_(steps=0)
    with pytest.raises(ConfigError, match="name of a variant"):
        pgd.with_(name=3)
    assert pgd.settings() == before


def test_a_variant_keeps_what_is_no_setting() -> None:
    surrogate = nn.Linear(2, 2)
    transfer = Transfer(steps=5).bind(surrogate)
    transfer.progress = True
    variant = transfer.with_(steps=7)
    assert variant.surrogate_model is surrogate and variant.progress and variant.steps == 7
    assert transfer.steps == 5


def test_with_eot_is_the_one_eot_builder() -> None:
    pgd = PGD(steps=3)
    eot = with_eot(pgd, 4)
    assert (eot.name, eot.eot_samples, type(eot)) == ("eot_pgd", 4, PGD)
    assert (pgd.name, pgd.eot_samples) == ("pgd", 1)
    built = build_attack({"name": "eot", "attack": "fgsm", "samples": 3})
    assert (built.name, type(built)) == ("eot_fgsm", FGSM)
    assert isinstance(built, GradientAttack) and built.eot_samples == 3


def test_every_attack_rebuilds_from_its_settings() -> None:
    """``settings()`` (what ``with_`` starts from) reads every constructor keyword back unchanged."""
    specs = [{"name": name} for name in available_attacks()]
    specs += [{"name": n, "backend": b} for n in ("fgsm", "pgd") for b in ("torchattacks", "art")]
    for spec in specs:
        attack = build_attack(spec)
        rebuilt = type(attack)(**attack.settings())
        assert rebuilt.params() == attack.params(), spec


def test_the_options_types_name_exactly_the_constructor_keywords() -> None:
    """The TypedDicts that type ``**kwargs`` pass-through must not drift from the constructors."""
    for options, cls in ((AttackOptions, Attack), (GradientOptions, GradientAttack), (PGDOptions, PGD)):
        keys = options.__required_keys__ | options.__optional_keys__
        assert keys == set(constructor_parameters(cls)), cls


def test_restarts_keep_first_hits_and_attack_only_the_unfooled() -> None:
    x = torch.zeros(4, 1)
    hits = [[True, False, True, False], [True, False], [True]]  # per restart, on the samples it attacks
    restarts = Restarts(x, 5, early_stop=True)
    attacked = []
    for restart, idx in restarts:
        attacked.append(idx.tolist())
        candidate = torch.full((idx.numel(), 1), float(restart + 1))
        restarts.record_hits(torch.tensor(hits[restart]), candidate, idx)
        restarts.keep_misses(candidate, idx)
    assert attacked == [[0, 1, 2, 3], [1, 3], [3]], "stops once every sample is fooled"
    assert restarts.result.flatten().tolist() == [1.0, 2.0, 1.0, 3.0]
    assert bool(restarts.fooled.all())
    plain = Restarts(x, 2, early_stop=False)
    for restart, idx in plain:
        assert idx.tolist() == [0, 1, 2, 3], "without early stop every restart attacks every sample"
        candidate = torch.full((4, 1), float(restart + 1))
        plain.record_hits(torch.tensor([True, False, restart == 1, False]), candidate, idx)
        plain.keep_misses(candidate, idx)
    assert plain.result.flatten().tolist() == [1.0, 2.0, 2.0, 2.0], "a first hit is never replaced"


@dataclass
class _Rows(SampleRows):
    value: torch.Tensor
    label: str = "kept"


def test_drop_finished_keeps_every_tensor_aligned() -> None:
    state = _Rows(idx=torch.arange(3), value=torch.tensor([1.0, 2.0, 3.0]))
    restarts = Restarts(torch.zeros(3, 1), 1, early_stop=True)
    assert restarts.drop_finished(torch.tensor([False, False, False]), state) is state
    kept = restarts.drop_finished(torch.tensor([False, True, False]), state)
    assert kept is not None and kept.idx.tolist() == [0, 2] and kept.value.tolist() == [1.0, 3.0]
    assert kept.label == "kept" and state.idx.tolist() == [0, 1, 2]
    assert restarts.drop_finished(torch.tensor([True, True, True]), state) is None
    plain = Restarts(torch.zeros(3, 1), 1, early_stop=False)
    assert plain.drop_finished(torch.tensor([True, True, True]), state) is state
