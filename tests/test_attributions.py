"""Attribution maps on models with a known answer, their stability metric, the grid and the metrics."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from robustcnn.evaluation.attributions import METHODS, explain, rank_correlation, raw_attributions
from robustcnn.report.aligned import GradientSet
from robustcnn.report.heatmaps import attribution_grid, heat
from robustcnn.tracking.records import all_metric_rows, attribution_metric_rows


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()


def _images(seed: int = 1, n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_saliency_of_a_linear_model_is_the_weight_row_of_the_class() -> None:
    model, x = _linear(), _images()
    target = torch.tensor([0, 1, 2, 1])
    found = raw_attributions(model, x, target, "saliency")
    weight = model[1].weight.detach()
    torch.testing.assert_close(found, weight[target].reshape(x.shape))


def test_explain_keeps_each_clean_examples_true_class_input_gradient() -> None:
    """Known answer: a linear model's input gradient of class y is its weight row y, whatever the image."""
    model, x, labels = _linear(), _images(), torch.tensor([2, 0, 1, 2])
    found = explain(model, x, _images(seed=2), labels)
    assert found.gradients is not None
    torch.testing.assert_close(found.gradients, model[1].weight.detach()[labels].reshape(x.shape))


def test_integrated_gradients_of_a_linear_model_is_input_times_weight() -> None:
    model, x = _linear(), _images()
    target = torch.tensor([2, 0, 1, 0])
    found = raw_attributions(model, x, target, "integrated_gradients")
    expected = x * model[1].weight.detach()[target].reshape(x.shape)  # baseline 0: (x - 0) * w
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-6)


def test_grad_cam_matches_its_definition_on_a_one_by_one_conv() -> None:
    """Grad-CAM = relu(sum_c mean_hw(dy/dA_c) A_c); with a 1x1 conv and a linear head, dy/dA is a head row."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, kernel_size=1, bias=False)
    head = nn.Linear(2 * 16, 3)
    model = nn.Sequential(conv, nn.Flatten(), head).eval()
    x, target = _images(), torch.tensor([0, 1, 2, 0])
    found = raw_attributions(model, x, target, "grad_cam")
    activations = conv(x).detach()  # [n, 2, 4, 4]
    alpha = head.weight.detach()[target].reshape(-1, 2, 4, 4).mean(dim=(2, 3))  # [n, 2]
    expected = torch.relu((alpha[:, :, None, None] * activations).sum(1, keepdim=True))
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-6)


def test_grad_cam_needs_a_conv_layer_and_explain_leaves_it_out_without_one() -> None:
    with pytest.raises(ValueError, match="conv layer"):
        raw_attributions(_linear(), _images(), torch.tensor([0, 0, 0, 0]), "grad_cam")
    found = explain(_linear(), _images(), _images(seed=2), torch.tensor([0, 1, 2, 0]))
    assert sorted(found.maps) == ["integrated_gradients", "saliency"]


def test_a_linear_models_saliency_does_not_move_under_attack_but_its_ig_does() -> None:
    """Known answer for the stability metric: the input gradient of a linear model is the same
    everywhere (rho = 1), Integrated Gradients scales with the input (rho < 1 for another image)."""
    labels = torch.tensor([0, 1, 2, 0])
    found = explain(_linear(), _images(), _images(seed=2), labels, eps=0.3, attack="pgd")
    assert found.stability["saliency"] == pytest.approx(1.0)
    moved = found.stability["integrated_gradients"]
    assert moved is not None and moved < 0.9
    assert found.maps["saliency"].shape == (4, 4, 4, 4) and bool((found.maps["saliency"] >= 0).all())
    summary = found.summary()
    assert summary["methods"] == ["saliency", "integrated_gradients"] and summary["eps"] == 0.3
    rows = {name: value for name, value, _ in attribution_metric_rows({"attributions": summary})}
    assert rows["attribution_stability/saliency"] == pytest.approx(1.0)
    assert "timing/attribution_seconds" in rows


def test_rank_correlation_known_values_and_constant_maps() -> None:
    a = torch.arange(16.0).reshape(4, 4)
    assert rank_correlation(a, a * 3 + 1) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(a, torch.zeros(4, 4)) is None


def test_the_grid_has_a_row_block_per_method_and_the_metrics_reach_sync() -> None:
    assert heat(torch.zeros(3, 3).numpy()).max() == 0  # an all-zero map is black, not NaN
    found = explain(_lenet_like(), _images(), _images(seed=2), torch.tensor([0, 1, 2, 0]))
    assert sorted(found.maps) == sorted(METHODS)
    rows = {name for name, _, _ in all_metric_rows({"attributions": found.summary()})}
    assert {f"attribution_stability/{m}" for m in METHODS if found.stability[m] is not None} <= rows


def _lenet_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()


def test_attribution_grid_draws_every_example_and_method(tmp_path: Path) -> None:
    found = explain(_lenet_like(), _images(), _images(seed=2), torch.tensor([0, 1, 2, 0]))
    one = attribution_grid(
        tmp_path / "one.png", found.clean, found.adversarial, {"saliency": found.maps["saliency"]},
        found.predictions, found.labels, ("zero", "one", "two"),
    )  # fmt: skip
    every = attribution_grid(
        tmp_path / "all.png", found.clean, found.adversarial, found.maps, found.predictions, found.labels,
        stability=found.per_example,
    )  # fmt: skip
    small, big = Image.open(one), Image.open(every)
    assert small.width == big.width, "one column per kept example"
    assert big.height > 2 * small.height, "four rows of maps per method"


class _Run:
    """The two RunLogger calls log_attributions makes, recorded."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float | None, int]] = []
        self.artifacts: list[Path] = []

    def log_metric_rows(self, rows: list[tuple[str, float | None, int]]) -> None:
        self.rows += rows

    def log_artifact(self, path: Path, folder: str) -> None:
        self.artifacts.append(path)


def _battery(clean: torch.Tensor, adversarial: torch.Tensor) -> Any:
    """What log_attributions reads of a battery: one attack that ran at every eps, its kept examples."""
    eps = (0.0, 0.3)
    attack = SimpleNamespace(
        eps=eps, clean_examples=clean, adv_examples=torch.stack([clean, adversarial]),
        robust_accuracy=lambda: [1.0, 0.0],
    )  # fmt: skip
    return SimpleNamespace(threat=SimpleNamespace(eps=eps), attacks={"pgd": attack}, reference_eps=0.3)


def test_the_job_logs_the_grid_and_metrics_and_refuses_examples_it_cannot_label(tmp_path: Path) -> None:
    from robustcnn.jobs.outputs import log_attributions

    images, labels = _images(n=6), torch.tensor([0, 1, 2, 0, 1, 2])
    run = _Run()
    battery = _battery(images[:4], _images(seed=2))
    found = log_attributions(run, _lenet_like(), battery, images, labels, tmp_path, ())
    assert found is not None and found["attack"] == "pgd" and found["eps"] == 0.3 and found["examples"] == 4
    assert run.artifacts == [tmp_path / "attributions.png", tmp_path / "gradients.safetensors"]
    assert all(path.is_file() for path in run.artifacts)
    kept = GradientSet.load(run.artifacts[1])  # the dashboard's per-defense view, as data
    assert kept.images.shape == kept.gradients.shape == (4, 1, 4, 4) and kept.labels.tolist() == [0, 1, 2, 0]
    logged = {name for name, _, _ in run.rows}
    assert logged >= {"attribution_stability/saliency", "timing/attribution_seconds"}
    # kept examples that are not the first attacked images: their labels are unknown, nothing is drawn
    other = _Run()
    shuffled = _battery(images[2:6], _images(seed=2))
    assert log_attributions(other, _lenet_like(), shuffled, images, labels, tmp_path / "x", ()) is None
    assert other.rows == [] and other.artifacts == []


def test_a_background_load_runs_once_and_wait_joins_it() -> None:
    from robustcnn.background import BackgroundLoad

    calls: list[int] = []
    load = BackgroundLoad("robustcnn-test-load", lambda: calls.append(1))
    load.wait()  # never started: returns at once
    load.start()
    load.start()
    load.wait()
    assert calls == [1]


def test_grad_cam_of_a_model_that_repeats_the_batch_is_skipped_not_a_crash() -> None:
    """EOT at inference (dropout_inference) repeats the batch inside forward: no per-image Grad-CAM."""
    from robustcnn.evaluation.attributions import explain

    class Repeating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.head = nn.Linear(2 * 6 * 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            features = self.conv(x.repeat(4, 1, 1, 1))  # four draws per image, averaged below
            return self.head(features.flatten(1)).reshape(4, n, 3).mean(0)

    torch.manual_seed(0)
    x = torch.rand(3, 1, 6, 6)
    result = explain(Repeating(), x, (x + 0.1).clamp(0, 1), torch.tensor([0, 1, 2]))
    assert "grad_cam" not in result.maps and "saliency" in result.maps
    assert result.maps["saliency"].shape == (4, 3, 6, 6)
