"""Adversarial training (pgd_at, fgsm_at, trades): real robustness gains on a tiny MNIST slice,
the collapse guard, the eps warm-up, settings validation and a clean gradient state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from robustcnn.attacks import PGD
from robustcnn.defenses.adversarial_training import (
    AdversarialSettings,
    CollapseGuard,
    FastAdversarialTraining,
    PGDAdversarialTraining,
    Trades,
)
from robustcnn.defenses.base import build_defense
from robustcnn.errors import ConfigError
from robustcnn.models import build_model
from robustcnn.threat import ThreatModel
from robustcnn.training.loop import TrainConfig, TrainContext, TrainHook, build_optimizer, fit

CPU = torch.device("cpu")
CONF = Path(__file__).resolve().parents[1] / "conf" / "defense"
EPS = 0.2
#: Short runs on 1,000 images: enough for PGD-3 training to show a clear gain at eps 0.2.
TRAIN = TrainConfig(epochs=2, batch_size=50, shift=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One intra-op thread: these nets are too small to gain from more, and on a shared 2-core
    machine a second spinning thread per process multiplies the wall time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slice_data() -> Any:
    from robustcnn.data import load_dataset

    return load_dataset("mnist5k", max_train=1000, max_test=200)


def new_model(data: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    info = data.info
    return build_model(
        "lenet5", input_shape=info.input_shape, num_classes=info.num_classes, mean=info.mean, std=info.std
    )


def train(data: Any, defense: Any) -> torch.nn.Module:
    model = new_model(data)
    hooks = defense.hooks(0, data.x_train, data.y_train) if defense is not None else []
    fit(model, data.x_train, data.y_train, TRAIN, CPU, hooks=hooks, seed=0, progress=False)
    return model


def accuracies(model: torch.nn.Module, data: Any) -> tuple[float, float]:
    """(clean, PGD-10 robust) accuracy at EPS on the test slice."""
    result = PGD(steps=10, seed=1).run(model, data.x_test, data.y_test, ThreatModel("linf", eps=(0.0, EPS)))
    clean, robust = result.robust_accuracy()
    return clean, robust


@pytest.fixture(scope="module")
def baseline(slice_data: Any) -> tuple[float, float]:
    return accuracies(train(slice_data, None), slice_data)


@pytest.mark.parametrize(
    "defense",
    [PGDAdversarialTraining(eps=EPS, steps=3), Trades(eps=EPS, steps=3, beta=6.0)],
    ids=["pgd_at", "trades"],
)
def test_adversarial_training_raises_robust_accuracy(slice_data: Any, baseline: tuple, defense: Any) -> None:
    model = train(slice_data, defense)
    clean, robust = accuracies(model, slice_data)
    base_clean, base_robust = baseline
    assert robust >= base_robust + 0.15, (robust, base_robust)
    assert clean >= 0.6, clean  # robust, not merely broken
    report = defense.report()
    assert report["final_train_eps"] == pytest.approx(EPS)
    assert 0.0 <= report["final_adv_train_accuracy"] <= 1.0


def test_warmup_schedule_values() -> None:
    settings = AdversarialSettings(eps=0.3, warmup_epochs=2.0)
    values = [settings.eps_at(step, 10) for step in (0, 9, 18, 19, 20, 500)]
    assert values == pytest.approx([0.015, 0.15, 0.285, 0.3, 0.3, 0.3])
    assert AdversarialSettings(eps=0.3).eps_at(0, 10) == 0.3  # no warm-up: full eps at once
    half = AdversarialSettings(eps=0.2, warmup_epochs=0.5)
    assert [half.eps_at(s, 10) for s in range(6)] == pytest.approx([0.04, 0.08, 0.12, 0.16, 0.2, 0.2])
    # float round-off (0.3 epochs x 10 steps) still ends the warm-up exactly
    assert AdversarialSettings(eps=0.1, warmup_epochs=0.3).warmup_fraction(2, 10) == 1.0


def test_warmup_reaches_the_loop_per_batch(slice_data: Any) -> None:
    defense = PGDAdversarialTraining(eps=0.3, steps=1, warmup_epochs=2)
    seen: list[float] = []
    hook = defense.hooks(0, slice_data.x_train, slice_data.y_train)[0]
    craft = hook.craft

    def spy(ctx: TrainContext, x: torch.Tensor, y: torch.Tensor, eps: float, pctx: Any) -> torch.Tensor:
        seen.append(eps)
        return craft(ctx, x, y, eps, pctx)

    hook.craft = spy  # type: ignore[method-assign]
    config = TrainConfig(epochs=3, batch_size=50, max_batches=4, shift=0)
    result = fit(
        new_model(slice_data),
        slice_data.x_train,
        slice_data.y_train,
        config,
        CPU,
        hooks=[hook],
        progress=False,
    )
    assert seen == pytest.approx([0.3 * (s + 1) / 8 for s in range(8)] + [0.3] * 4)
    assert [row["train_eps"] for row in result.history] == pytest.approx([0.15, 0.3, 0.3])


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (PGDAdversarialTraining, {"eps": 1.5}),
        (PGDAdversarialTraining, {"eps": -0.1}),
        (PGDAdversarialTraining, {"steps": 0}),
        (PGDAdversarialTraining, {"norm": "l1"}),
        (PGDAdversarialTraining, {"warmup_epochs": -1}),
        (PGDAdversarialTraining, {"step_size": 0}),
        (PGDAdversarialTraining, {"eps": "big"}),
        (Trades, {"beta": -1.0}),
        (Trades, {"steps": 0}),
        (Trades, {"eps": 2.0}),
        (FastAdversarialTraining, {"on_collapse": "panic"}),
        (FastAdversarialTraining, {"guard_samples": 0}),
        (FastAdversarialTraining, {"collapse_drop": 0}),
        (FastAdversarialTraining, {"warmup_epochs": -0.5}),
        (FastAdversarialTraining, {"escalate_steps": 0}),
    ],
)
def test_bad_settings_raise_config_error(cls: type, kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="defense\\."):
        cls(**kwargs)


def test_settings_a_variant_fixes_are_refused() -> None:
    """fgsm_at fixes steps and random_start, trades random_start: neither accepts nor reports them."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'steps'"):
        FastAdversarialTraining(steps=3)
    with pytest.raises(ConfigError, match=r"no setting\(s\) \['random_start'\]"):
        build_defense({"name": "trades", "random_start": True})
    assert "random_start" not in Trades().params() and "steps" not in FastAdversarialTraining().params()


def test_only_real_settings_are_accepted() -> None:
    """The shared settings object is no config key (it once was listed as one, and then failed)."""
    with pytest.raises(ConfigError, match=r"no setting\(s\) \['settings'\]"):
        build_defense({"name": "pgd_at", "settings": {"eps": 0.1}})


def test_l2_eps_may_exceed_one() -> None:
    assert PGDAdversarialTraining(eps=2.0, norm="l2").params()["eps"] == 2.0


def test_configs_build_and_document_every_setting() -> None:
    import robustcnn.defenses.adversarial_training  # noqa: F401  (registers the defenses)

    for name in ("pgd_at", "fgsm_at", "trades"):
        text = (CONF / f"{name}.yaml").read_text()
        spec = yaml.safe_load(text)
        assert next(iter(spec)) == "name" and spec["name"] == name and spec["base"] is None
        defense = build_defense(spec)
        assert set(defense.params()) == set(spec) - {"name"}, name
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line and not line.startswith((" ", "#", "name:")):
                assert lines[i - 1].startswith("#"), f"{name}.yaml: {line!r} has no comment"


def _ctx(model: torch.nn.Module) -> TrainContext:
    config = TrainConfig(epochs=1, batch_size=32)
    return TrainContext(
        model=model, optimizer=build_optimizer(model, config), device=CPU, config=config, step=3
    )


@pytest.mark.parametrize("defense", [PGDAdversarialTraining(eps=0.3, steps=3), Trades(eps=0.3, steps=3)])
def test_only_the_outer_loss_touches_parameters(slice_data: Any, defense: Any) -> None:
    model = new_model(slice_data).train()
    x, y = slice_data.x_train[:32], slice_data.y_train[:32]
    hook = defense.hooks(0, x, y)[0]
    ctx = _ctx(model)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 7.0)  # a stale gradient of the "previous step"
    loss = hook.compute_loss(ctx, x, y)
    assert loss is not None and loss.requires_grad
    assert all(p.grad is None for p in params), "the inner maximisation left parameter gradients"
    assert model.training and all(p.requires_grad for p in params)
    loss.backward()
    got = [p.grad.clone() for p in params]

    x_adv = hook.adversarial_batch(ctx, x, y)  # same step, same seed: the same examples
    assert (
        float((x_adv - x).abs().max()) <= 0.3 + 1e-6
        and 0.0 <= float(x_adv.min()) <= float(x_adv.max()) <= 1.0
    )
    assert float((x_adv - x).abs().max()) > 0.1  # actually perturbed
    model.zero_grad(set_to_none=True)
    logits_adv = model(x_adv)
    if isinstance(defense, Trades):
        logits = model(x)
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean")
        reference = F.cross_entropy(logits, y) + defense.beta * kl
    else:
        reference = F.cross_entropy(logits_adv, y)
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    reference.backward()
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad)


class _Snapshots(TrainHook):
    """Records the weights at every epoch end (after the guard has acted)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        self.states.append({k: v.clone() for k, v in ctx.model.state_dict().items()})


def _fake_guard_fit(
    data: Any, sequence: list[tuple[float, float]], on_collapse: str, warmup_epochs: float = 0.0
) -> tuple:
    defense = FastAdversarialTraining(
        eps=0.1, guard_samples=32, on_collapse=on_collapse, warmup_epochs=warmup_epochs
    )
    hooks = defense.hooks(0, data.x_train, data.y_train)
    guard = hooks[1]
    assert isinstance(guard, CollapseGuard)
    feed = iter(sequence)
    guard.evaluate = lambda model, eps: next(feed)  # type: ignore[method-assign]
    spy = _Snapshots()
    model = new_model(data)
    config = TrainConfig(epochs=len(sequence), batch_size=50, max_batches=2, shift=0)
    result = fit(model, data.x_train, data.y_train, config, CPU, hooks=[*hooks, spy], progress=False)
    return defense, model, spy, result


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_guard_detects_a_drop_stops_and_restores_the_best(slice_data: Any) -> None:
    sequence = [(0.60, 0.70), (0.70, 0.75), (0.10, 0.90), (0.70, 0.75)]
    defense, model, spy, result = _fake_guard_fit(slice_data, sequence, "stop")
    assert result.epochs_run == 3  # stopped at the collapse
    assert _same(model, spy.states[1]) and not _same(model, spy.states[2])
    report = defense.report()
    assert report["collapse_epochs"] == [3] and report["kept_epoch"] == 2 and report["checkpoint_restored"]
    event = result.notes["collapses"][0]
    assert event["before"] == 0.70 and event["after"] == 0.10 and "below the best" in event["reason"]
    assert result.notes["kept_epoch"] == 2
    assert [row["guard_robust_accuracy"] for row in result.history] == [0.60, 0.70, 0.10]
    assert result.history[2]["guard_collapse"] == 1.0


def test_guard_ratio_test_with_continue_keeps_training(slice_data: Any) -> None:
    sequence = [(0.60, 0.65), (0.40, 0.90), (0.55, 0.60)]
    defense, model, spy, result = _fake_guard_fit(slice_data, sequence, "continue")
    assert result.epochs_run == 3
    report = defense.report()
    assert report["collapse_epochs"] == [2] and "FGSM" in report["collapses"][0]["reason"]
    assert report["kept_epoch"] == 1 and _same(model, spy.states[0])


def test_guard_ratio_test_waits_for_the_warmup_but_the_drop_test_does_not(slice_data: Any) -> None:
    # epoch 1 (warm-up): PGD << FGSM is expected of a model trained at a smaller eps, not a collapse;
    # epoch 2 (still warm-up): a fall of 0.3 below the best is one; epoch 3 (warmed up): ratio test on
    sequence = [(0.10, 0.60), (0.40, 0.50), (0.10, 0.45), (0.45, 0.50), (0.28, 0.60)]
    defense, model, spy, result = _fake_guard_fit(slice_data, sequence, "restore", warmup_epochs=3)
    assert result.epochs_run == 5
    report = defense.report()
    assert report["collapse_epochs"] == [3, 5]
    assert "best" in report["collapses"][0]["reason"] and "FGSM" in report["collapses"][1]["reason"]
    # restore: the collapsed epochs continue from the best checkpoint (epoch 2, then epoch 4)
    assert _same(model, spy.states[3]) and report["kept_epoch"] == 4
    assert all(row["guard_eps"] == pytest.approx(0.1) for row in result.history)


def test_guard_keeps_a_flagged_epoch_that_still_beats_the_best(slice_data: Any) -> None:
    # what lenet5 does at eps 0.3: 0 % PGD at the end of the warm-up, then FGSM-only robustness
    sequence = [(0.0, 0.30), (0.09, 0.66), (0.5, 0.5)]
    defense, model, spy, result = _fake_guard_fit(slice_data, sequence, "stop", warmup_epochs=2)
    report = defense.report()
    assert result.epochs_run == 2 and report["collapse_epochs"] == [2]
    assert report["kept_epoch"] == 2 and not report["checkpoint_restored"] and _same(model, spy.states[1])
    assert report["collapses"][0]["best_before"] == 0.0 and report["collapses"][0]["best_epoch"] == 1


def test_guard_escalate_switches_to_pgd_once_and_then_only_logs(slice_data: Any) -> None:
    # epoch 2: collapse -> best checkpoint (epoch 1) reloaded, training attack becomes PGD-3;
    # epoch 3: the ratio test fails again while PGD-3 rebuilds robustness: logged, not reloaded
    sequence = [(0.50, 0.60), (0.05, 0.70), (0.20, 0.60), (0.55, 0.65)]
    defense, model, spy, result = _fake_guard_fit(slice_data, sequence, "escalate")
    trainer = defense._hooks[0]
    assert trainer.settings.steps == 3 and trainer.attack.steps == 3
    assert trainer.settings.alpha(0.1) == pytest.approx(2.5 * 0.1 / 3)
    report = defense.report()
    assert result.epochs_run == 4 and report["collapse_epochs"] == [2, 3] and report["escalated_epoch"] == 2
    assert report["collapses"][0]["action"] == "escalate: PGD-3 from here on"
    assert report["collapses"][1]["action"] == "continue (already escalated)"
    def equal(a: dict, b: dict) -> bool:
        return all(torch.equal(v, b[k]) for k, v in a.items())

    assert equal(spy.states[1], spy.states[0])  # reloaded at the collapse
    assert not equal(spy.states[2], spy.states[0])  # trained on (with PGD-2) after the second one
    assert report["kept_epoch"] == 4 and _same(model, spy.states[3])


def test_fgsm_at_guard_runs_a_real_pgd(slice_data: Any) -> None:
    defense = FastAdversarialTraining(eps=0.1, guard_samples=64, guard_steps=5)
    config = TrainConfig(epochs=2, batch_size=50, max_batches=5, shift=0)
    model = new_model(slice_data)
    hooks = defense.hooks(0, slice_data.x_train, slice_data.y_train)
    result = fit(model, slice_data.x_train, slice_data.y_train, config, CPU, hooks=hooks, progress=False)
    for row in result.history:
        assert 0.0 <= row["guard_robust_accuracy"] <= row["guard_fgsm_accuracy"] + 0.1
        assert row["guard_eps"] == pytest.approx(0.1) and "adv_train_accuracy" in row
    report = defense.report()
    assert report["kept_epoch"] in (1, 2) and len(report["guard_robust_accuracy"]) == 2


def test_post_train_fine_tunes_only_with_a_base(slice_data: Any) -> None:
    calls: list[tuple[list, int]] = []

    def fake_fit(model: torch.nn.Module, hooks: list, epochs: int) -> None:
        calls.append((hooks, epochs))

    model = new_model(slice_data)
    args = (model, slice_data.x_train, slice_data.y_train, CPU, fake_fit, 0)
    assert PGDAdversarialTraining().post_train(*args) == {} and not calls
    PGDAdversarialTraining(base="none", finetune_epochs=2).post_train(*args)
    assert len(calls) == 1 and calls[0][1] == 2 and calls[0][0]
