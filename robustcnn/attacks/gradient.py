"""Gradient attacks' shared piece: the objective, its input gradient, and EOT averaging.

Why here and not in each attack: FGSM, PGD and the backends must agree on what they maximise
(cross-entropy or the CW margin; targeted = move towards the target), and EOT (Athalye et al.
2018) is nothing but averaging this gradient over draws of a stochastic model, so one
implementation serves every gradient attack. Gradients are taken w.r.t. the input only
(parameters are frozen by the base), which is the cheapest possible backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.attacks.base import Attack, PerturbContext
from robustcnn.errors import ConfigError

LOSSES = ("ce", "margin")


def objective(logits: Tensor, y: Tensor, targets: Tensor | None, loss: str) -> Tensor:
    """Per-sample objective that the attack *maximises*."""
    if loss == "ce":
        if targets is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -F.cross_entropy(logits, targets, reduction="none")
    # CW margin: (best other logit - true logit) untargeted; (target - best other) targeted
    label = y if targets is None else targets
    true = logits.gather(1, label[:, None]).squeeze(1)
    others = logits.scatter(1, label[:, None], float("-inf")).amax(1)
    return others - true if targets is None else true - others


def step_direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction of unit size for the norm (sign for linf, normalised for l2)."""
    if norm == "linf":
        return grad.sign()
    flat = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return grad / flat.view(-1, *([1] * (grad.dim() - 1)))


class GradientAttack(Attack):
    """An attack driven by the input gradient of :func:`objective` (optionally EOT-averaged)."""

    def __init__(self, *, loss: str = "ce", eot_samples: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if loss not in LOSSES:
            raise ConfigError(f"attack.loss={loss!r} is unknown; choose one of {', '.join(LOSSES)}")
        if int(eot_samples) < 1:
            raise ConfigError(f"attack.eot_samples={eot_samples} must be >= 1")
        self.loss = loss
        self.eot_samples = int(eot_samples)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "loss": self.loss, "eot_samples": self.eot_samples}

    def gradient(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, ctx: PerturbContext
    ) -> tuple[Tensor, Tensor]:
        """(input gradient of the objective, logits of the last draw), averaged over EOT draws."""
        x = x.detach().requires_grad_(True)
        total = torch.zeros_like(x)
        logits = None
        for _ in range(self.eot_samples):
            with ctx.autocast():
                logits = model(x).float()
            value = objective(logits, y, targets, self.loss).sum()
            (grad,) = torch.autograd.grad(value, x)
            total += grad
        ctx.counters["gradient"] += x.shape[0] * self.eot_samples
        ctx.counters["forward"] += x.shape[0] * self.eot_samples
        assert logits is not None
        return total / self.eot_samples, logits.detach()
