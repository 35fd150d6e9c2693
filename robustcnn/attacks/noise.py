"""Random noise of the attack's size: the floor every real attack must beat.

A white-box attack that does no better than random points of the same eps ball is broken or the
model's gradients are masked (Carlini et al. 2019; Athalye et al. 2018, sign 4). ``samples``
draws are tried per image and any draw that fools the model counts, which makes the baseline
honest rather than weak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from robustcnn.attacks.base import Attack, AttackOptions
from robustcnn.attacks.context import PerturbContext, goal_reached
from robustcnn.attacks.result import SettingValue
from robustcnn.errors import ConfigError
from robustcnn.threat import ThreatModel, project

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11+; only the type checker reads it

KINDS = ("sign", "uniform")


class RandomNoise(Attack):
    name = "noise"
    uses_gradients = False

    def __init__(self, *, kind: str = "sign", samples: int = 8, **kwargs: Unpack[AttackOptions]) -> None:
        super().__init__(**kwargs)
        if kind not in KINDS:
            raise ConfigError(f"attack.kind={kind!r} is unknown; choose one of {', '.join(KINDS)}")
        if int(samples) < 1:
            raise ConfigError(f"attack.samples={samples} must be >= 1")
        self.kind = kind
        self.samples = int(samples)

    def params(self) -> dict[str, SettingValue]:
        return {**super().params(), "kind": self.kind, "samples": self.samples}

    def draw(self, x: Tensor, eps: float, norm: str, ctx: PerturbContext, stream: int) -> Tensor:
        shape = tuple(x.shape[1:])
        if norm == "linf":
            u = ctx.random(shape, stream)
            delta = (u.round() * 2 - 1) * eps if self.kind == "sign" else (2 * u - 1) * eps
        else:  # a random direction on the sphere of radius eps (uniform: radius drawn in [0, eps])
            d = ctx.random(shape, stream, kind="normal")
            d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * len(shape)))
            radius = eps if self.kind == "sign" else ctx.random((1,) * len(shape), stream + 10_000) * eps
            delta = d * radius
        return project(x + delta, x, eps, norm, ctx.bounds)

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
        result = x.clone()
        pending = None
        for draw in range(self.samples):
            candidate = self.draw(x, eps, threat.norm, ctx, stream=draw)
            hit = goal_reached(ctx.logits(model, candidate), y, targets)
            take = hit if pending is None else hit & pending
            if pending is None:
                result = candidate.clone()  # an unsuccessful sample reports its first draw
                pending = ~hit
            else:
                result[take] = candidate[take]
                pending &= ~hit
            if not bool(pending.any()):
                break
        return result
