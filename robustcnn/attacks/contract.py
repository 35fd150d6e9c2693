"""The invariants every attack run is held to: valid inputs, eval mode with frozen parameters, and
candidates inside the eps ball and the bounds (a violation is a bug: :class:`AttackInvariantError`).

Why apart from the :class:`~robustcnn.attacks.base.Attack` class: the battery and the face attack
reuse ``attack_mode`` and ``input_bounds`` without being attacks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from robustcnn.errors import ConfigError, RobustCNNError
from robustcnn.threat import project

#: Slack allowed between an attack's raw output and the eps ball / bounds before projection.
BALL_TOLERANCE = 1e-4
BOUNDS_TOLERANCE = 1e-5


#: Sees every adversarial example an attack reports: (the clean batch, its reported examples, the eps).
#: Why: a check of the threat model must measure the images themselves, not the norms the base
#: recorded (evaluation/checks.py, ``ThreatWitness``).
ExampleInspector = Callable[[Tensor, Tensor, float], None]


class AttackInvariantError(RobustCNNError):
    """An attack broke its contract (left the eps ball or bounds, touched parameters): a bug."""

    exit_code = 3


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters while attacking; both restored afterwards, and verified."""
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads_before = [None if p.grad is None else p.grad.clone() for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    if any(gradient_changed(before, p.grad) for p, before in zip(params, grads_before, strict=True)):
        raise AttackInvariantError("an attack accumulated gradients into the model's parameters")


def gradient_changed(before: Tensor | None, after: Tensor | None) -> bool:
    """A parameter's ``.grad`` appeared, vanished or changed."""
    if before is None or after is None:
        return (before is None) != (after is None)
    return not torch.equal(before, after)


def validate_inputs(model: nn.Module, x: Tensor, y: Tensor, bounds: tuple[float, float]) -> None:
    """Reject bad inputs before any work, each with the problem and the fix."""
    if x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"images {tuple(x.shape)} and labels {tuple(y.shape)} do not match; "
            "pass x as [N, C, H, W] and y as [N]"
        )
    if not torch.is_floating_point(x):
        raise ConfigError(f"images must be floating point in [0,1], got dtype {x.dtype}; divide uint8 by 255")
    if not bool(torch.isfinite(x).all()):
        raise ConfigError("images contain NaN or infinite values; clean the input before attacking")
    lo, hi = float(x.min()), float(x.max())
    if lo < bounds[0] - BOUNDS_TOLERANCE or hi > bounds[1] + BOUNDS_TOLERANCE:
        raise ConfigError(
            f"images lie in [{lo:.3g}, {hi:.3g}] but the model's bounds are {list(bounds)}; "
            "attacks take raw images (the Classifier normalizes them itself)"
        )
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ConfigError(f"labels must be integers, got dtype {y.dtype}")
    num_classes = getattr(model, "num_classes", None)
    with torch.no_grad():
        out = model(x[:2])
    if out.dim() != 2 or out.shape[0] != min(2, x.shape[0]):
        raise ConfigError(
            f"the model returns shape {tuple(out.shape)} for 2 images; it must return logits [N, classes]"
        )
    num_classes = num_classes or out.shape[1]
    if out.shape[1] != num_classes:
        raise ConfigError(f"the model returns {out.shape[1]} logits but declares {num_classes} classes")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ConfigError(
            f"labels lie in [{int(y.min())}, {int(y.max())}] but the model has {num_classes} "
            "classes; labels must be 0..classes-1"
        )


def input_bounds(model: nn.Module) -> tuple[float, float]:
    """The pixel range the model takes (a :class:`Classifier` declares it; [0, 1] otherwise)."""
    low, high = getattr(model, "bounds", (0.0, 1.0))
    return (low, high)


def settled_projection(raw: Tensor, x: Tensor, norm: str, bounds: tuple[float, float]) -> Tensor:
    """``raw`` as the base's projection leaves it at any eps whose ball holds it, bit for bit.

    Why: a minimum-norm attack's example is measured once and then reported at every eps whose ball
    holds it; the base projects every candidate, and ``x + (raw - x)`` may differ from ``raw`` in
    the last bit. Projecting until nothing moves (float round-off settles after a step or two) gives
    the tensor that every later projection returns unchanged, so what was measured is what is reported.
    """
    current = project(raw, x, math.inf, norm, bounds)
    for _ in range(3):
        again = project(current, x, math.inf, norm, bounds)
        if torch.equal(again, current):
            break
        current = again
    return current
