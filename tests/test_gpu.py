"""CUDA paths (bf16 autocast, channels_last, on-device attacks). Skipped without a GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch

from robustcnn.attacks import FGSM, PGD
from robustcnn.batching import clean_accuracy
from robustcnn.models import build_model
from robustcnn.threat import ThreatModel
from robustcnn.training.loop import TrainConfig, fit

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def test_training_on_cuda_with_bf16_and_channels_last(mnist_small) -> None:
    info = mnist_small.info
    torch.manual_seed(0)
    model = build_model("lenet5", input_shape=info.input_shape, num_classes=10, mean=info.mean, std=info.std)
    result = fit(
        model, mnist_small.x_train, mnist_small.y_train, TrainConfig(epochs=3, shift=2), CUDA, progress=False
    )
    assert next(model.parameters()).is_cuda
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    acc = clean_accuracy(model, mnist_small.x_test, mnist_small.y_test, 1000, CUDA, amp=True).accuracy
    assert acc > 0.95, acc


def test_attacks_on_cuda_match_cpu(trained_lenet, mnist_small) -> None:
    x, y = mnist_small.x_test[:512], mnist_small.y_test[:512]
    threat = ThreatModel(norm="linf", eps=(0.0, 0.1, 0.2, 0.3))
    cpu = PGD(steps=40).run(trained_lenet, x, y, threat).robust_accuracy()
    model = trained_lenet.to(CUDA)
    try:
        gpu = PGD(steps=40).run(model, x, y, threat).robust_accuracy()
        bf16 = PGD(steps=40, amp=True).run(model, x, y, threat).robust_accuracy()
        fgsm = FGSM().run(model, x, y, threat).robust_accuracy()
    finally:
        trained_lenet.to("cpu")
    assert gpu[-1] <= 0.01 and bf16[-1] <= 0.01
    assert all(abs(a - b) <= 0.02 for a, b in zip(cpu, gpu, strict=True)), (cpu, gpu)
    assert all(f >= p for f, p in zip(fgsm, gpu, strict=True))
