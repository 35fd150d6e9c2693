"""The training loop, its hooks and the weight cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from robustcnn.errors import CacheError, ConfigError
from robustcnn.training.cache import WeightCache
from robustcnn.training.loop import TrainConfig, TrainContext, TrainHook, fit


def _toy_problem(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes separable by mean brightness: any CNN learns it in a few steps."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1) * 0.5
    return x, y


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2))


def test_fit_learns_and_reports_history() -> None:
    torch.manual_seed(0)  # the net's initialisation must not depend on which tests ran before in the worker
    x, y = _toy_problem()
    model = _tiny_net()
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-2, scheduler="none")
    result = fit(model, x, y, cfg, torch.device("cpu"), progress=False)
    assert result.epochs_run == 3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["train_accuracy"] > 0.9
    assert result.images_per_s > 0 and not model.training


def test_fit_is_reproducible_with_a_seed() -> None:
    x, y = _toy_problem()
    weights = []
    for _ in range(2):
        torch.manual_seed(1)
        model = _tiny_net()
        fit(model, x, y, TrainConfig(epochs=1, batch_size=32), torch.device("cpu"), seed=5, progress=False)
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_hooks_replace_the_loss_and_can_stop_training() -> None:
    calls: list[str] = []

    class Recorder(TrainHook):
        def on_fit_start(self, ctx: TrainContext) -> None:
            calls.append("start")

        def compute_loss(self, ctx: TrainContext, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            calls.append("loss")
            return nn.functional.cross_entropy(ctx.model(x), y) * 0.0 + ctx.model[0].weight.sum() * 0

        def on_epoch_end(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
            metrics["hook_metric"] = 1.0
            ctx.stop = True

        def on_fit_end(self, ctx: TrainContext) -> None:
            calls.append("end")

    x, y = _toy_problem(64)
    result = fit(
        _tiny_net(),
        x,
        y,
        TrainConfig(epochs=5, batch_size=32),
        torch.device("cpu"),
        hooks=[Recorder()],
        progress=False,
    )
    assert result.epochs_run == 1, "ctx.stop must end training after the epoch"
    assert calls == ["start", "loss", "loss", "end"]
    assert result.history[0]["hook_metric"] == 1.0
    assert "train_accuracy" not in result.history[0], "no accuracy is invented when a hook owns the loss"


def test_max_batches_limits_an_epoch() -> None:
    x, y = _toy_problem(256)
    calls = []

    class Count(TrainHook):
        def compute_loss(self, ctx, x, y):  # type: ignore[no-untyped-def]
            calls.append(1)
            return None

    fit(
        _tiny_net(),
        x,
        y,
        TrainConfig(epochs=2, batch_size=32, max_batches=3),
        torch.device("cpu"),
        hooks=[Count()],
        progress=False,
    )
    assert len(calls) == 6


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"epochs": -1}, "training.epochs"),
        ({"batch_size": 0}, "training.batch_size"),
        ({"optimizer": {"name": "rmsprop"}}, "adam"),
        ({"optimizer": {"lr": 0}}, "lr"),
        ({"scheduler": {"name": "warp"}}, "cosine"),
    ],
)
def test_train_config_rejects_bad_values(mapping: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_mapping(mapping)


def test_cache_round_trip_and_corruption_is_detected(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path / "c")
    model = _tiny_net()
    cache.save("k1", model, {"note": "x"})
    clone = _tiny_net()
    meta = cache.load("k1", clone)
    assert meta is not None and meta["note"] == "x" and len(meta["sha256"]) == 64
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
    # truncate the weights file: the entry must be refused and removed, never loaded
    weights = cache.weights_path("k1")
    weights.write_bytes(weights.read_bytes()[:50])
    assert cache.load("k1", _tiny_net()) is None
    assert not weights.exists() and not cache.meta_path("k1").exists()


def test_cache_miss_and_bad_sidecar(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    assert cache.load("absent", _tiny_net()) is None
    cache.save("k", _tiny_net(), {})
    cache.meta_path("k").write_text("{not json")
    assert cache.load("k", _tiny_net()) is None
    cache.save("k2", _tiny_net(), {})
    assert json.loads(cache.meta_path("k2").read_text())["key"] == "k2"


def test_cache_unwritable_folder_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="paths.cache_dir"):
        WeightCache(blocker / "sub").ensure_writable()


def test_random_shift_moves_each_image_within_bounds() -> None:
    from robustcnn.training.loop import random_shift

    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert torch.allclose(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))  # a 2-pixel shift keeps the blob inside
    assert not torch.equal(shifted, x)
    centres = (shifted[:, 0].nonzero()[:, 1:].float().view(64, 4, 2).mean(1) - 3.5).abs()
    assert float(centres.max()) <= 2.0
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)
