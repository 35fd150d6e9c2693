"""Regularisation defenses: each one's effect on a tiny model, weight decay's two forms, the runner."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustcnn.config import compose
from robustcnn.defenses import build_defense
from robustcnn.defenses.regularisation import weight_statistics
from robustcnn.errors import ConfigError
from robustcnn.jobs.classify import check_classify_config
from robustcnn.jobs.inputs import to_container
from robustcnn.training.loop import TrainConfig, TrainHook, build_optimizer, fit

CPU = torch.device("cpu")


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two separable classes of 4x4 'images' whose label depends on a few pixels only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(256, 1, 4, 4, generator=g)
    y = (x[:, 0, 0, :2].sum(1) > 1.0).long()
    return x, y


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))


def _train(defense_spec: dict[str, Any] | None, epochs: int = 15, lr: float = 0.01) -> nn.Module:
    """Train ``_net`` on ``_data`` with the defense's hooks and training settings (None: no defense)."""
    model, (x, y) = _net(), _data()
    config = TrainConfig(epochs=epochs, batch_size=32, lr=lr, scheduler="none", amp=False)
    hooks: list[TrainHook] = []
    if defense_spec is not None:
        defense = build_defense(defense_spec)
        hooks = defense.hooks(0, x, y)
        config = dataclasses.replace(config, **defense.training_overrides())
    fit(model, x, y, config, CPU, hooks=hooks, seed=0, progress=False)
    return model


def _input_gradient_norm(model: nn.Module) -> float:
    x, y = _data(seed=1)
    inputs = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(inputs), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, inputs)
    return float(grad.flatten(1).norm(dim=1).mean())


def test_l1_leaves_more_near_zero_weights_than_none() -> None:
    plain = weight_statistics(_train(None), 1e-3)["near_zero_fraction"]
    sparse = weight_statistics(_train({"name": "l1", "strength": 1e-3}), 1e-3)["near_zero_fraction"]
    assert sparse > plain + 0.2, (plain, sparse)


def test_input_gradient_shrinks_the_input_gradient_on_the_same_data_and_seed() -> None:
    plain = _input_gradient_norm(_train(None))
    regularised = _input_gradient_norm(_train({"name": "input_gradient", "strength": 1.0}))
    assert regularised < 0.7 * plain, (plain, regularised)


def test_input_gradient_logs_its_gradient_norm_and_accuracy_per_epoch() -> None:
    model, (x, y) = _net(), _data()
    hooks = build_defense({"name": "input_gradient", "strength": 0.1, "norm": "l1"}).hooks(0, x, y)
    result = fit(
        model, x, y, TrainConfig(epochs=2, batch_size=64, amp=False), CPU, hooks=hooks, progress=False
    )
    assert all(row["input_grad_norm"] > 0 and 0 <= row["train_accuracy"] <= 1 for row in result.history)


def _one_step_from_zero_gradient(decoupled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights before, after) one Adam step whose data gradient is zero: only the decay acts."""
    model = nn.Linear(4, 3)
    config = TrainConfig(lr=0.01, weight_decay=0.1, decoupled_weight_decay=decoupled)
    optimizer = build_optimizer(model, config)
    before = model.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return before, model.weight.detach()


def test_decoupled_decay_shrinks_every_weight_by_the_same_factor() -> None:
    """AdamW: w <- w (1 - lr wd), whatever the weight's size; coupled Adam normalises wd*w to ~lr*sign(w)."""
    before, after = _one_step_from_zero_gradient(decoupled=True)
    torch.testing.assert_close(after, before * (1 - 0.01 * 0.1))
    before, after = _one_step_from_zero_gradient(decoupled=False)
    torch.testing.assert_close(after, before - 0.01 * torch.sign(before), atol=1e-6, rtol=0)


def test_weight_decay_defense_sets_the_optimizer_and_both_forms_shrink_the_weights() -> None:
    coupled = build_defense({"name": "weight_decay", "strength": 0.05})
    assert coupled.training_overrides() == {"weight_decay": 0.05, "decoupled_weight_decay": False}
    plain = weight_statistics(_train(None), 1e-3)["weight_l2_norm"]
    for spec in ({"strength": 0.05}, {"strength": 1.0, "decoupled": True}):
        decayed = weight_statistics(_train({"name": "weight_decay", **spec}), 1e-3)["weight_l2_norm"]
        assert decayed < 0.9 * plain, (spec, plain, decayed)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["defense=weight_decay", "defense.decoupled=true", "training.optimizer.name=sgd"], "AdamW"),
        (["defense=weight_decay", "defense.decoupled=yes"], "defense.decoupled"),
        (["defense=l1", "defense.strength=-1"], "defense.strength"),
        (["defense=input_gradient", "defense.norm=linf"], "defense.norm"),
        (["defense=input_gradient", "defense.base=none", "defense.finetune_epochs=0"], "finetune_epochs"),
    ],
)
def test_bad_regularisation_settings_are_one_clear_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_classify_config(to_container(compose(overrides)), device=False)


def test_l1_penalty_is_added_to_an_adversarial_loss_too() -> None:
    """The penalty composes with whichever hook makes the loss: the loop adds it after the loss."""

    class Fixed(TrainHook):
        def compute_loss(self, ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return ctx.model(x).sum() * 0.0

    model, (x, y) = _net(), _data()
    penalty = build_defense({"name": "l1", "strength": 1e-2}).hooks(0, x, y)
    config = TrainConfig(epochs=1, batch_size=256, amp=False, scheduler="none")
    before = weight_statistics(model, 0.0)["weight_l1_norm"]
    result = fit(model, x, y, config, CPU, hooks=[Fixed(), *penalty], progress=False)
    assert result.history[0]["train_loss"] == pytest.approx(1e-2 * before, rel=1e-4)
    assert weight_statistics(model, 0.0)["weight_l1_norm"] < before


@pytest.mark.slow
def test_robustcnn_run_trains_each_regulariser_and_reports_its_cost(isolated: dict) -> None:
    from robustcnn.jobs.dispatch import run_job

    tiny = [
        "data.max_train=300",
        "data.max_test=50",
        "training.epochs=1",
        "training.batch_size=50",
        "attack=[]",
    ]
    for name in ("weight_decay", "l1", "input_gradient"):
        results = run_job(compose([*tiny, f"defense={name}"]), progress=False)
        report = results["defense_report"]
        assert results["defense"] == name and report["epoch_cost_ratio"] > 0, report
        assert 0 <= report["near_zero_fraction"] <= 1
    composed = run_job(
        compose([*tiny, "defense=prune", "defense.base=l1", "defense.finetune=none"]), progress=False
    )
    assert composed["defense_report"]["sparsity"] == pytest.approx(0.5, abs=0.01)
