"""FGSM (Goodfellow et al. 2015): one step of size eps along the gradient's sign (L2: direction).

The single-step baseline: every iterative attack must do at least as well (a sanity check).
"""

from __future__ import annotations

from torch import Tensor, nn

from robustcnn.attacks.context import PerturbContext
from robustcnn.attacks.gradient import GradientAttack, step_direction
from robustcnn.threat import ThreatModel


class FGSM(GradientAttack):
    name = "fgsm"

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float,
        threat: ThreatModel,
        targets: Tensor | None,
        ctx: PerturbContext,
    ) -> Tensor:
        grad, _ = self.gradient(model, x, y, targets, ctx)
        return (x + eps * step_direction(grad, threat.norm)).clamp(*ctx.bounds)
