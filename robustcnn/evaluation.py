"""Evaluation of a classifier on clean images (the attack battery builds on these helpers)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


def autocast_for(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (when enabled), nothing elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict(model: nn.Module, x: Tensor, batch_size: int, device: torch.device, amp: bool = False) -> Tensor:
    """Predicted labels for ``x`` (kept on ``device``), evaluated in eval mode in large batches."""
    was_training = model.training
    model.eval()
    try:
        preds = []
        for start in range(0, x.shape[0], batch_size):
            batch = x[start : start + batch_size].to(device, non_blocking=True)
            with autocast_for(device, amp):
                preds.append(model(batch).argmax(1))
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=device)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class CleanResult:
    accuracy: float
    correct: Tensor  # bool [N] on the device: which samples the model gets right
    seconds: float
    images_per_s: float


def clean_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device, amp: bool = False
) -> CleanResult:
    """Accuracy on clean images plus the per-sample correctness mask attacks start from."""
    start = time.perf_counter()
    preds = predict(model, x, batch_size, device, amp)
    correct = preds == y.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    n = max(int(y.shape[0]), 1)
    return CleanResult(
        accuracy=float(correct.float().sum().item() / n),
        correct=correct,
        seconds=seconds,
        images_per_s=y.shape[0] / max(seconds, 1e-9),
    )
