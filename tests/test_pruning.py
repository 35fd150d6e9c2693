"""The ``prune`` defense: sparsity reached, masks that hold through fine-tuning, real channel removal."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustcnn.defenses import build_defense
from robustcnn.defenses.pruning import PruneDefense, channel_masks, prunable_weights
from robustcnn.errors import ConfigError, ModelError
from robustcnn.models import build_model
from robustcnn.training.loop import TrainConfig, fit

CPU = torch.device("cpu")


def _model(name: str = "lenet5", seed: int = 0, **kw: Any) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, input_shape=(1, 28, 28), num_classes=10, mean=[0.13], std=[0.31], **kw)


def _prune(**settings: Any) -> PruneDefense:
    defense = build_defense({"name": "prune", **settings})
    assert isinstance(defense, PruneDefense)
    return defense


class _Fit:
    """The runner's ``fit(model, hooks=[...], epochs=N)`` on a small slice; records its calls."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.calls: list[int] = []

    def __call__(self, model: nn.Module, hooks: Any = (), epochs: int = 1) -> Any:
        self.calls.append(epochs)
        config = TrainConfig(epochs=epochs, batch_size=64)
        return fit(model, self.x, self.y, config, CPU, hooks=hooks, seed=0, progress=False)


def _no_fit(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("fit must not be called without fine-tuning")


def _zero_fraction(model: nn.Module) -> float:
    weights = [w.detach() for _, w in prunable_weights(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize(
    "settings",
    [
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"sparsity": "half"},
        {"method": "random"},
        {"schedule": "gradual"},
        {"finetune": "trades"},
        {"finetune_epochs": -1},
        {"iterations": 0},
        {"finetune_steps": 0},
        {"finetune_eps": 0.0},
    ],
)
def test_bad_settings_fail_in_the_constructor(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(settings))):
        build_defense({"name": "prune", **settings})


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_magnitude_global_reaches_the_sparsity_with_a_fresh_models_keys(sparsity: float) -> None:
    model = _model()
    report = _prune(method="magnitude_global", sparsity=sparsity, finetune="none").post_train(
        model, torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long), CPU, _no_fit, 0
    )
    assert abs(_zero_fraction(model) - sparsity) < 0.01
    assert abs(report["sparsity"] - sparsity) < 0.01
    fresh = _model(seed=1).state_dict()
    assert list(model.state_dict()) == list(fresh)
    assert all(model.state_dict()[k].shape == v.shape for k, v in fresh.items())
    # global, not per layer: the big fc1 layer is pruned harder than the small conv1
    assert (model.net.fc1.weight == 0).float().mean() > (model.net.conv1.weight == 0).float().mean()
    assert report["nonzero_params_after"] < report["nonzero_params_before"] == report["params_before"]
    json.dumps(report)  # stored as cache metadata


def test_clean_finetune_keeps_pruned_weights_at_zero(trained_lenet: nn.Module, mnist_small: Any) -> None:
    data = mnist_small
    x_test, y_test = data.x_test[:500], data.y_test[:500]
    pruned = copy.deepcopy(trained_lenet)
    _prune(sparsity=0.8, finetune="none").post_train(pruned, data.x_train, data.y_train, CPU, _no_fit, 0)
    tuned = copy.deepcopy(trained_lenet)
    run = _Fit(data.x_train[:1000], data.y_train[:1000])
    report = _prune(sparsity=0.8, finetune="clean", finetune_epochs=1).post_train(
        tuned, data.x_train, data.y_train, CPU, run, 0
    )
    assert run.calls == [1] and "finetune_final_train_loss" in report
    changed = False
    for (_, w_pruned), (_, w_tuned) in zip(prunable_weights(pruned), prunable_weights(tuned), strict=True):
        zero = w_pruned == 0
        assert torch.all(w_tuned[zero] == 0), "fine-tuning regrew pruned weights"
        changed |= not torch.equal(w_tuned[~zero], w_pruned[~zero])
    assert changed, "fine-tuning did not train the surviving weights"
    assert abs(report["sparsity"] - 0.8) < 0.01
    # 80 % magnitude pruning barely hurts lenet5 here, and the fine-tuned model stays close to dense
    assert _accuracy(tuned, x_test, y_test) >= _accuracy(trained_lenet, x_test, y_test) - 0.03


def test_clean_finetune_recovers_accuracy_lost_to_channel_pruning(
    trained_lenet: nn.Module, mnist_small: Any
) -> None:
    data = mnist_small
    x_test, y_test = data.x_test[:500], data.y_test[:500]
    settings = {"method": "l1_structured", "sparsity": 0.8}
    pruned = copy.deepcopy(trained_lenet)
    _prune(**settings, finetune="none").post_train(pruned, data.x_train, data.y_train, CPU, _no_fit, 0)
    tuned = copy.deepcopy(trained_lenet)
    run = _Fit(data.x_train[:1000], data.y_train[:1000])
    _prune(**settings, finetune="clean", finetune_epochs=1).post_train(
        tuned, data.x_train, data.y_train, CPU, run, 0
    )
    before, after = _accuracy(pruned, x_test, y_test), _accuracy(tuned, x_test, y_test)
    assert before < 0.6 and after > before + 0.3, (before, after)


def _shrunk_lenet(model: nn.Module, sparsity: float = 0.5) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(masked full-size copy, shrunk model, report) of one l1_structured pruning without fine-tuning."""
    masked = copy.deepcopy(model)
    channel_masks(masked, sparsity, {})[1].apply(masked)
    report = _prune(method="l1_structured", sparsity=sparsity, finetune="none").post_train(
        model, torch.rand(16, 1, 28, 28), torch.zeros(16, dtype=torch.long), CPU, _no_fit, 0
    )
    return masked, model, report


def test_l1_structured_shrinks_lenet_and_keeps_its_function(
    trained_lenet: nn.Module, mnist_small: Any
) -> None:
    masked, shrunk, report = _shrunk_lenet(copy.deepcopy(trained_lenet))
    net = shrunk.net
    assert net.conv1.weight.shape == (16, 1, 3, 3) and net.conv1.bias.shape == (16,)
    assert net.conv2.weight.shape == (32, 16, 3, 3)
    assert net.fc1.weight.shape == (200, 32 * 7 * 7) and net.fc2.weight.shape == (10, 200)
    assert report["shrunk"] and report["kept_channels"] == {"net.conv1": 16, "net.conv2": 32}
    assert report["params_after"] < 0.55 * report["params_before"]
    assert report["state_dict_bytes_after"] < 0.55 * report["state_dict_bytes_before"]
    assert report["cpu_latency_ms_after"] > 0 and report["cpu_latency_ms_before"] > 0
    x = mnist_small.x_test[:200]
    with torch.no_grad():
        torch.testing.assert_close(shrunk.eval()(x), masked.eval()(x), atol=1e-5, rtol=1e-5)
    assert list(shrunk.state_dict()) == list(_model().state_dict())


def test_prepare_for_load_rebuilds_the_shrunk_model_from_the_report(tmp_path: Path) -> None:
    _, shrunk, report = _shrunk_lenet(_model(), sparsity=0.3)
    save_file({k: v.contiguous() for k, v in shrunk.state_dict().items()}, tmp_path / "w.safetensors")
    stored = json.loads(json.dumps(report))  # as the cache stores and reads it
    fresh = _model(seed=3)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    loaded = _prune(method="l1_structured", sparsity=0.3).prepare_for_load(fresh, stored)
    loaded.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), shrunk.eval()(x))
    with pytest.raises(ModelError, match="weight cache"):  # a report made for another architecture
        _prune(method="l1_structured").prepare_for_load(_model(), {"shrunk": True, "kept_channels": {}})


def test_vgg_batch_norm_channels_are_removed_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("robustcnn.defenses.pruning.LATENCY_BATCH", 8)  # timing is not checked here
    model = _model("vgg11_small", width=0.125)
    with torch.no_grad():  # non-trivial batch-norm statistics and affine parameters
        model.train()(torch.rand(32, 1, 28, 28))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    masked, shrunk, report = _shrunk_lenet(model, sparsity=0.5)
    assert report["shrunk"] and shrunk.net.features[1].num_features == 4
    assert shrunk.net.classifier.in_features == report["kept_channels"]["net.features.25"]
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(shrunk.eval()(x), masked.eval()(x), atol=1e-5, rtol=1e-5)


def test_residual_models_keep_zeroed_channels_and_say_so() -> None:
    model = _model("resnet18", width=0.125)
    report = _prune(method="l1_structured", sparsity=0.5, finetune="none").post_train(
        model, torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long), CPU, _no_fit, 0
    )
    assert report["shrunk"] is False and "not supported" in report["shrink_note"]
    fresh = _model("resnet18", width=0.125).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.items()}
    assert _prune(method="l1_structured").prepare_for_load(_model("resnet18", width=0.125), report)
    conv, bn = model.net.layer1[0].conv1, model.net.layer1[0].bn1
    dead = conv.weight.flatten(1).abs().sum(1) == 0
    assert int(dead.sum()) == conv.out_channels - report["kept_channels"]["net.layer1.0.conv1"]
    assert torch.all(bn.weight[dead] == 0) and torch.all(bn.bias[dead] == 0)
    assert report["nonzero_params_after"] < 0.6 * report["params_after"]


def test_iterative_schedule_reaches_the_target_in_equal_steps(mnist_small: Any) -> None:
    run = _Fit(mnist_small.x_train[:128], mnist_small.y_train[:128])
    seen: list[float] = []
    original = run.__call__

    def record(model: nn.Module, hooks: Any = (), epochs: int = 1) -> Any:
        seen.append(_zero_fraction(model))
        return original(model, hooks=hooks, epochs=epochs)

    model = _model()
    report = _prune(
        sparsity=0.9, schedule="iterative", iterations=3, finetune="clean", finetune_epochs=3
    ).post_train(model, mnist_small.x_train, mnist_small.y_train, CPU, record, 0)
    assert run.calls == [1, 1, 1]
    assert [round(s, 2) for s in seen] == [0.3, 0.6, 0.9]
    assert abs(_zero_fraction(model) - 0.9) < 0.01 and abs(report["sparsity"] - 0.9) < 0.01

    structured = _model()
    report = _prune(
        method="l1_structured", sparsity=0.5, schedule="iterative", iterations=2, finetune="none"
    ).post_train(structured, mnist_small.x_train, mnist_small.y_train, CPU, _no_fit, 0)
    assert report["kept_channels"] == {"net.conv1": 16, "net.conv2": 32}


def test_adversarial_finetune_uses_pgd_training_and_keeps_zeros(mnist_small: Any) -> None:
    pytest.importorskip("robustcnn.defenses.adversarial_training")
    model = _model()
    run: Callable[..., Any] = _Fit(mnist_small.x_train[:128], mnist_small.y_train[:128])
    report = _prune(sparsity=0.7, finetune="adversarial", finetune_epochs=1, finetune_steps=2).post_train(
        model, mnist_small.x_train, mnist_small.y_train, CPU, run, 0
    )
    assert abs(_zero_fraction(model) - 0.7) < 0.01
    # the PGD hook replaced the loss and reported its own figures at the requested radius
    assert report["finetune_final_train_eps"] == pytest.approx(0.3)
    assert 0.0 <= report["finetune_final_adv_train_accuracy"] <= 1.0
