"""Attack backends: torchattacks and ART run our FGSM/PGD with the same meaning as the native code.

The fast tests use a tiny CNN on 8x8 images; the slow agreement test trains lenet5 on mnist5k and
checks that the three backends report the same robust accuracy (within 2 points) at every eps.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import robustcnn.attacks.backends  # noqa: F401  (registers the backends)
from robustcnn.attacks import FGSM, PGD, Attack, AttackResult, build_attack
from robustcnn.attacks.backends import ArtFGSM, ArtPGD, TorchattacksFGSM, TorchattacksPGD
from robustcnn.attacks.backends.art_backend import MarginLoss
from robustcnn.attacks.gradient import objective
from robustcnn.errors import ConfigError
from robustcnn.models.classifier import Classifier
from robustcnn.threat import ThreatModel, perturbation_norms

LINF = ThreatModel(norm="linf", eps=(0.0, 0.05, 0.1, 0.3))
L2 = ThreatModel(norm="l2", eps=(0.0, 0.5, 1.5))
BACKEND_CLASSES = {"fgsm": (FGSM, TorchattacksFGSM, ArtFGSM), "pgd": (PGD, TorchattacksPGD, ArtPGD)}
LIBRARY_CLASSES = [TorchattacksFGSM, ArtFGSM, TorchattacksPGD, ArtPGD]
ROOT = Path(__file__).resolve().parents[1]
Tiny = tuple[Classifier, torch.Tensor, torch.Tensor]


def _tiny_model(bounds: tuple[float, float] = (0.0, 1.0)) -> Classifier:
    """A small CNN with a BatchNorm and a dropout, so a mode change would change its outputs."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(6 * 8 * 8, 4),
    )
    model = Classifier(net, mean=[0.5], std=[0.25], input_shape=(1, 8, 8), num_classes=4, bounds=bounds)
    model.eval()
    return model


def _batch(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _settings(cls: type[Attack]) -> dict[str, Any]:
    return {"steps": 5, "batch_size": 32} if issubclass(cls, PGD) else {"batch_size": 32}


def _norms(cls: type[Attack]) -> list[ThreatModel]:
    return [LINF] if cls is TorchattacksFGSM else [LINF, L2]


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    model = _tiny_model()
    x, y = _batch()
    # labels the model agrees with, so every sample is attacked
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_importing_backends_imports_neither_library() -> None:
    code = (
        "import sys, robustcnn.attacks.backends; "
        "print(sorted(m for m in ('torchattacks', 'art') if m in sys.modules))"
    )
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env
    )
    assert out.stdout.strip() == "[]"


def test_build_attack_returns_the_backend_classes_with_native_settings() -> None:
    art = build_attack({"name": "pgd", "backend": "art", "steps": 5})
    assert type(art) is ArtPGD and art.steps == 5
    assert type(build_attack({"name": "pgd", "backend": "torchattacks"})) is TorchattacksPGD
    assert type(build_attack({"name": "fgsm", "backend": "art"})) is ArtFGSM
    assert type(build_attack({"name": "fgsm", "backend": "torchattacks"})) is TorchattacksFGSM
    settings = {"steps": 7, "rel_step_size": 2.0, "restarts": 2, "seed": 3, "batch_size": 64}
    native = build_attack({"name": "pgd", **settings})
    for backend in ("art", "torchattacks"):
        params = build_attack({"name": "pgd", "backend": backend, **settings}).params()
        assert params == {**native.params(), "backend": backend}, "same settings, only the library differs"
    with pytest.raises(ConfigError, match="no setting"):
        build_attack({"name": "pgd", "backend": "art", "max_iter": 5})


def _trained_looking_model(x: torch.Tensor) -> tuple[Classifier, list[bool]]:
    """A tiny model in train mode with gradients left by training, that logs its mode per forward."""
    model = _tiny_model()
    model(x).logsumexp(1).sum().backward()  # in eval mode: BatchNorm statistics stay as they are
    model.train()
    modes: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    return model, modes


@pytest.mark.parametrize("cls", LIBRARY_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
def test_backend_keeps_the_invariants(cls: type[Attack], targeted: bool, tiny: Tiny) -> None:
    """Mode, requires_grad, .grad and buffers come back as they were, and exactly as native leaves them.

    ART's loss_gradient calls model.zero_grad() and switches modes; torchattacks calls model.train()
    after an attack if the model it holds says it was training. The native attack is the reference
    for buffers and train-mode forwards (the base itself runs one forward before entering eval mode).
    """
    _, x, y = tiny
    native_cls = PGD if issubclass(cls, PGD) else FGSM
    for base_threat in _norms(cls):
        threat = ThreatModel(norm=base_threat.norm, eps=base_threat.eps, targeted=targeted)
        native, native_modes = _trained_looking_model(x)
        native_cls(**_settings(cls))(native, x, y, threat)
        model, modes = _trained_looking_model(x)
        grads = [p.grad.clone() for p in model.parameters()]
        result = cls(**_settings(cls))(model, x, y, threat)
        assert model.training and all(m.training for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
        assert sum(modes) == sum(native_modes), "the library ran the model in train mode"
        reference = native.state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
        _check_result(result, threat, x)
        assert result.success_rate()[-1] > 0.5, (cls.__name__, threat.norm, result.success_rate())
        assert result.gradient_passes > 0 and result.forward_passes > result.gradient_passes


def _check_result(result: AttackResult, threat: ThreatModel, x: torch.Tensor) -> None:
    """Reported examples inside each eps ball and [0, 1]; success never lost as eps grows.

    Only the last row of ``adv_examples`` is checked against its ball: on the CPU the base stores
    every row as a view of one tensor that it keeps updating (see the report to the base's owner).
    """
    for e, eps in enumerate(threat.eps):
        assert float(result.norms[e].max()) <= eps + 1e-5
    adv = result.adv_examples[-1]
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float(perturbation_norms(adv - x[: adv.shape[0]], threat.norm).max()) <= threat.eps[-1] + 1e-5
    assert bool((result.success[1:] >= result.success[:-1]).all())


@pytest.mark.parametrize("kind", ["fgsm", "pgd"])
def test_backends_agree_on_the_tiny_model(kind: str, tiny: Tiny) -> None:
    """FGSM is deterministic: the three libraries must find the same examples (up to one sample)."""
    model, x, y = tiny
    tolerance = 1.5 / x.shape[0] if kind == "fgsm" else 0.15
    for threat in (LINF, L2):
        results = [
            cls(**_settings(cls))(model, x, y, threat).robust_accuracy()
            for cls in BACKEND_CLASSES[kind]
            if threat in _norms(cls)
        ]
        for other in results[1:]:
            assert np.allclose(results[0], other, atol=tolerance), (kind, threat.norm, results)


def test_targeted_backends_reach_the_target(tiny: Tiny) -> None:
    """Targeted success (prediction == target) is re-measured by the base: the libraries got the targets."""
    model, x, y = tiny
    threat = ThreatModel(norm="linf", eps=(0.0, 0.3), targeted=True, target="fixed", target_class=2)
    keep = y != 2
    for cls in (PGD, TorchattacksPGD, ArtPGD):
        result = cls(steps=10)(model, x[keep], y[keep], threat)
        assert result.success_rate()[-1] > 0.8, (cls.__name__, result.success_rate())


def test_backends_are_reproducible_and_leave_the_global_rngs_alone(tiny: Tiny) -> None:
    model, x, y = tiny
    for cls in (TorchattacksPGD, ArtPGD):
        torch.manual_seed(123)
        np.random.seed(123)
        first = cls(steps=3, restarts=2, seed=5)(model, x, y, LINF)
        after_torch, after_numpy = torch.rand(3), np.random.rand(3)
        torch.manual_seed(123)
        np.random.seed(123)
        assert torch.equal(after_torch, torch.rand(3)) and np.array_equal(after_numpy, np.random.rand(3))
        second = cls(steps=3, restarts=2, seed=5)(model, x, y, LINF)
        assert torch.equal(first.adv_examples, second.adv_examples)
        assert first.robust_accuracy() == second.robust_accuracy()


def test_unsupported_settings_are_refused_clearly(tiny: Tiny) -> None:
    model, x, y = tiny
    with pytest.raises(ConfigError, match="cross-entropy only"):
        TorchattacksPGD(loss="margin")
    with pytest.raises(ConfigError, match="cross-entropy only"):
        build_attack({"name": "fgsm", "backend": "torchattacks", "loss": "margin"})
    with pytest.raises(ConfigError, match="eot_samples"):
        TorchattacksFGSM(eot_samples=2)
    with pytest.raises(ConfigError, match="eot_samples"):
        ArtPGD(eot_samples=2)
    with pytest.raises(ConfigError, match="no l2 FGSM"):
        TorchattacksFGSM()(model, x, y, L2)
    with pytest.raises(ConfigError, match="EOTPGD is L-inf only"):
        TorchattacksPGD(eot_samples=2)(model, x, y, L2)
    scaled = _tiny_model(bounds=(0.0, 2.0))
    with pytest.raises(ConfigError, match=r"clamps images to \[0, 1\]"):
        TorchattacksPGD(steps=2)(scaled, x, y, LINF)
    assert not scaled.training


def test_art_margin_loss_matches_the_native_objective() -> None:
    """ART ascends the loss untargeted and descends it towards the target: both must equal ours."""
    g = torch.Generator().manual_seed(0)
    logits, y, t = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g), torch.arange(6) % 5
    y_hot, t_hot = nn.functional.one_hot(y, 5).float(), nn.functional.one_hot(t, 5).float()
    assert torch.allclose(MarginLoss()(logits, y_hot), objective(logits, y, None, "margin").sum())
    assert torch.allclose(-MarginLoss()(logits, t_hot), objective(logits, y, t, "margin").sum())


def test_art_margin_pgd_runs(tiny: Tiny) -> None:
    model, x, y = tiny
    native = PGD(steps=5, loss="margin")(model, x, y, LINF).robust_accuracy()
    art = ArtPGD(steps=5, loss="margin")(model, x, y, LINF).robust_accuracy()
    assert np.allclose(native, art, atol=0.15), (native, art)


@pytest.mark.parametrize(
    ("module", "install", "cls"),
    [
        ("torchattacks", "pip install --no-deps torchattacks", TorchattacksPGD),
        ("art", "pip install adversarial-robustness-toolbox", ArtFGSM),
    ],
)
def test_a_missing_library_names_its_pip_command(
    module: str, install: str, cls: type[Attack], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == module else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError, match=install):
        cls()


@pytest.mark.gpu
def test_backends_on_cuda_with_amp() -> None:
    model = _tiny_model().cuda()
    x, y = _batch()
    with torch.no_grad():
        y = model(x.cuda()).argmax(1).cpu()
    for cls in LIBRARY_CLASSES:
        for threat in _norms(cls):
            result = cls(amp=True, **_settings(cls))(model, x, y, threat)
            _check_result(result, threat, x)
            assert result.success_rate()[-1] > 0.5


# -- agreement on a trained model ----------------------------------------------------------------
AGREEMENT_EPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)
AGREEMENT_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def trained(trained_lenet, mnist_small) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared undefended lenet5 (conftest) and 512 test images."""
    return trained_lenet, mnist_small.x_test[:512], mnist_small.y_test[:512]


def _assert_agreement(
    kind: str,
    threat: ThreatModel,
    settings: dict[str, Any],
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = trained
    table = {
        cls.__name__: cls(**settings)(model, x, y, threat).robust_accuracy() for cls in BACKEND_CLASSES[kind]
    }
    print(f"\n{kind} {threat.norm} eps={list(threat.eps)}")
    for name, accuracy in table.items():
        print(f"  {name:18s} " + " ".join(f"{a:.4f}" for a in accuracy))
    names = list(table)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            gaps = np.abs(np.array(table[first]) - np.array(table[second]))
            assert (gaps <= AGREEMENT_TOLERANCE + 1e-9).all(), (kind, threat.norm, first, second, table)
    # a non-robust MNIST net: the attack must really work, or agreement would be vacuous
    assert table[names[0]][-1] < 0.5 * table[names[0]][0]


@pytest.mark.slow
def test_backends_agree_linf(trained: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    threat = ThreatModel(norm="linf", eps=AGREEMENT_EPS)
    _assert_agreement("fgsm", threat, {"batch_size": 512}, trained)
    _assert_agreement("pgd", threat, {"steps": 10, "random_start": True, "batch_size": 512}, trained)


@pytest.mark.slow
def test_backends_agree_pgd_l2(trained: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    """L2 steps and projection agree. Without a random start: torchattacks' PGDL2 draws its start
    radius uniformly in (0, eps) where native and ART draw points uniformly in the ball, a
    documented difference of the library that moved robust accuracy by 2.5 points at eps 2.0."""
    threat = ThreatModel(norm="l2", eps=(0.0, 1.0, 2.0))
    _assert_agreement("pgd", threat, {"steps": 10, "random_start": False, "batch_size": 512}, trained)


@pytest.mark.parametrize("cls", LIBRARY_CLASSES, ids=lambda c: c.__name__)
def test_a_variant_of_a_backend_attack_runs_on_the_same_library(cls: type[Attack]) -> None:
    attack = cls(**_settings(cls))
    variant = attack.with_(seed=5, name="probe")
    assert type(variant) is cls and variant.backend == attack.backend
    assert (variant.seed, variant.name, attack.seed, attack.name) == (5, "probe", 0, cls.name)
