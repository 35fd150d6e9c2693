"""Gradient attacks' shared piece: the objective, its input gradient, and EOT averaging.

Why here and not in each attack: FGSM, PGD and the backends must agree on what they maximise
(cross-entropy or the CW margin; targeted = move towards the target), and EOT (Athalye et al.
2018) is nothing but averaging this gradient over draws of a stochastic model, so one
implementation serves every gradient attack. Gradients are taken w.r.t. the input only
(parameters are frozen by the base), which is the cheapest possible backward pass.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.attacks.base import Attack, AttackOptions
from robustcnn.attacks.context import PerturbContext
from robustcnn.attacks.result import SettingValue
from robustcnn.errors import ConfigError

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11+; only the type checker reads it

LOSSES = ("ce", "margin", "dlr")


def objective(logits: Tensor, y: Tensor, targets: Tensor | None, loss: str) -> Tensor:
    """Per-sample objective that the attack *maximises*."""
    if loss == "ce":
        if targets is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -F.cross_entropy(logits, targets, reduction="none")
    if loss == "dlr":
        return dlr(logits, y, targets)
    # CW margin: (best other logit - true logit) untargeted; (target - best other) targeted
    label = y if targets is None else targets
    true = logits.gather(1, label[:, None]).squeeze(1)
    others = logits.scatter(1, label[:, None], float("-inf")).amax(1)
    return others - true if targets is None else true - others


def dlr(logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020): the CW margin divided by the logit spread.

    Scale-invariant, so a model cannot hide behind huge or tiny logits (a gradient-masking symptom
    that stalls CE). Untargeted: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3); targeted:
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2). Needs >= 3 classes (>= 4 targeted).
    """
    ordered = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    if targets is None:
        others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return -(true - others) / (ordered[:, 0] - ordered[:, 2] + 1e-12)
    target = logits.gather(1, targets[:, None]).squeeze(1)
    return -(true - target) / (ordered[:, 0] - (ordered[:, 2] + ordered[:, 3]) / 2 + 1e-12)


def step_direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction of unit size for the norm (sign for linf, normalised for l2)."""
    if norm == "linf":
        return grad.sign()
    flat = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return grad / flat.view(-1, *([1] * (grad.dim() - 1)))


class GradientOptions(AttackOptions, total=False):
    """The settings every gradient attack takes (:class:`GradientAttack`'s and the base's keywords)."""

    loss: str
    eot_samples: int


class GradientAttack(Attack):
    """An attack driven by the input gradient of :func:`objective` (optionally EOT-averaged)."""

    def __init__(self, *, loss: str = "ce", eot_samples: int = 1, **kwargs: Unpack[AttackOptions]) -> None:
        super().__init__(**kwargs)
        if loss not in LOSSES:
            raise ConfigError(f"attack.loss={loss!r} is unknown; choose one of {', '.join(LOSSES)}")
        if int(eot_samples) < 1:
            raise ConfigError(f"attack.eot_samples={eot_samples} must be >= 1")
        self.loss = loss
        self.eot_samples = int(eot_samples)

    def params(self) -> dict[str, SettingValue]:
        return {**super().params(), "loss": self.loss, "eot_samples": self.eot_samples}

    def gradient(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, ctx: PerturbContext
    ) -> tuple[Tensor, Tensor]:
        """(input gradient of the objective, logits), both averaged over the EOT draws.

        With EOT each draw is one random forward pass: a model that averages several draws at
        inference (``inference_samples``) is attacked through single draws, so the expectation of
        the gradient is estimated from ``eot_samples`` draws at ``eot_samples`` passes' cost. The
        logits returned are the log of the draws' mean probability (the in-loop success signal;
        the base re-checks every result on the deployed model).
        """
        grad, log_probs, _ = self.gradient_and_logits(model, x, y, targets, ctx)
        return grad, log_probs

    def gradient_and_logits(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, ctx: PerturbContext
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`gradient` plus the raw fp32 logits when they are the deployed model's output on ``x``.

        The raw logits (None with EOT, or under bf16 autocast) let PGD hand the base the logits of
        the candidates it returns, so the base need not run the same forward pass a second time.
        One draw takes a short path (no accumulator): PGD-10's per-step overhead is what decides
        whether it stays within 5% of the bare forward + backward floor.
        """
        x = x.detach().requires_grad_(True)
        saved = getattr(model, "inference_samples", 1)
        single_draw = saved > 1
        if self.eot_samples == 1 and not single_draw:
            with ctx.autocast():
                logits = model(x).float()
            value = objective(logits, y, targets, self.loss).sum()
            (grad,) = torch.autograd.grad(value, x)
            ctx.counters["gradient"] += x.shape[0]
            ctx.counters["forward"] += x.shape[0]
            raw = logits.detach()
            return grad, raw.log_softmax(1), None if ctx.amp_active() else raw
        # EOT, or the naive attack on a model that averages draws at inference: single draws. The
        # naive attack's gradient is then one draw's (Athalye et al.'s single-sample gradient, at
        # one pass per step instead of inference_samples), and its logits are not the deployed
        # model's output, so none are vouched for.
        total = torch.zeros_like(x)
        log_probs = []
        try:
            if single_draw:
                # ignore: torch types a module attribute as Tensor | Module (nn.Module.__getattr__)
                model.inference_samples = 1  # type: ignore[assignment]
            for _ in range(self.eot_samples):
                with ctx.autocast():
                    logits = model(x).float()
                value = objective(logits, y, targets, self.loss).sum()
                (grad,) = torch.autograd.grad(value, x)
                total += grad
                log_probs.append(logits.detach().log_softmax(1))
        finally:
            if single_draw:
                model.inference_samples = saved  # type: ignore[assignment]  # as above
        ctx.counters["gradient"] += x.shape[0] * self.eot_samples
        ctx.counters["forward"] += x.shape[0] * self.eot_samples
        mean_log_prob = torch.logsumexp(torch.stack(log_probs), 0) - math.log(len(log_probs))
        return total / self.eot_samples, mean_log_prob, None
