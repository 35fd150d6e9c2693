"""Evaluation of a classifier on clean images (the attack battery builds on these helpers)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from robustcnn.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_out_of_memory(exc: BaseException) -> bool:
    """The device ran out of memory: CUDA's own error, or a RuntimeError saying so (MPS, cuDNN)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def out_of_memory_error(what: str, images: int, setting: str | None = None) -> ConfigError:
    """The error for a batch too small to halve: halving again cannot help, the user must act."""
    lower = f" (lowering {setting} cannot help)" if setting else ""
    return ConfigError(
        f"{what} ran out of GPU memory even with a batch of {images} image{'s' * (images != 1)}; "
        f"use a smaller model or input, or device=cpu{lower}"
    )


def in_batches(
    work: Callable[[int, int], T], total: int, batch_size: int, *, what: str, setting: str
) -> list[T]:
    """``work(begin, end)`` over ``[0, total)`` in slices of ``batch_size``, halving it on out-of-memory.

    Why: a batch size that fits one GPU (or one model) can exhaust another's memory mid-job, and
    losing hours of attacks to it is worse than running slower. The slice that ran out of memory
    is redone in halves, and every later slice uses the smaller size too (it would run out again).
    ``work`` must have no effect when it raises (its partial results are dropped with it).
    A single image that still does not fit raises a :class:`ConfigError`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{setting}={batch_size!r} must be a whole number >= 1, e.g. {setting}=256")
    results: list[T] = []
    begin = 0
    while begin < total:
        end = min(begin + batch_size, total)
        try:
            results.append(work(begin, end))
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            if end - begin == 1:
                raise out_of_memory_error(what, 1, setting) from exc
        else:
            begin = end
            continue
        # outside the except block: the traceback, and the activations it holds, are released now
        batch_size = (end - begin) // 2
        log.warning(
            "%s ran out of GPU memory with a batch of %d images; retrying with batches of %d "
            "(set %s lower to avoid the retry)",
            what,
            end - begin,
            batch_size,
            setting,
        )
        release_cached_memory()
    return results


def release_cached_memory() -> None:
    """Give the CUDA caching allocator's free blocks back, so a smaller retry can use them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def autocast_for(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA (when enabled), nothing elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict(model: nn.Module, x: Tensor, batch_size: int, device: torch.device, amp: bool = False) -> Tensor:
    """Predicted labels for ``x`` (kept on ``device``), evaluated in eval mode in large batches.

    The batch is halved when the device runs out of memory (see :func:`in_batches`).
    """

    def predict_slice(begin: int, end: int) -> Tensor:
        batch = x[begin:end].to(device, non_blocking=True)
        with autocast_for(device, amp):
            return model(batch).argmax(1)

    was_training = model.training
    model.eval()
    try:
        preds = in_batches(
            predict_slice, x.shape[0], batch_size, what="clean evaluation", setting="eval.batch_size"
        )
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
