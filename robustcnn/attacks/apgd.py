"""APGD (Croce & Hein 2020, the first attack of AutoAttack): PGD without a step size to tune.

Each sample starts with step 2 eps and a momentum of 0.75; at checkpoints spaced as in the paper
(22%, then shrinking gaps) its step is halved, and it jumps back to its best point so far, when
fewer than 75% of the steps since the last checkpoint raised the objective or when neither the
step nor the best objective changed. This adapts to each sample's loss surface, which is where a
fixed-step PGD under-reports: on an adversarially trained lenet5 at eps 0.3 a PGD-40 (CE) leaves
72% robust where AutoAttack finds 61.5% (benchmarks/audit_vs_autoattack.py).

As in :class:`PGD`, the first iterate that reaches the goal is the sample's result and, with
``early_stop``, a fooled sample leaves the batch (it changes no result, only the cost).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustcnn.attacks.base import PerturbContext, goal_reached, record_first_hits
from robustcnn.attacks.gradient import GradientAttack, objective, step_direction
from robustcnn.attacks.pgd import random_start
from robustcnn.errors import ConfigError
from robustcnn.threat import ThreatModel, project

MOMENTUM = 0.75
RHO = 0.75


def checkpoints(steps: int) -> list[int]:
    """Iterations after which the step may be halved.

    The paper's schedule: p1 = 0.22, p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06), times the budget.
    """
    fractions = [0.0, 0.22]
    while fractions[-1] < 1:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    return sorted({int(round(p * steps)) for p in fractions[1:] if 0 < round(p * steps) < steps})


class APGD(GradientAttack):
    name = "apgd"

    def __init__(
        self, *, steps: int = 100, restarts: int = 1, random_start: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if int(steps) < 2:
            raise ConfigError(f"attack.steps={steps} must be >= 2")
        if int(restarts) < 1:
            raise ConfigError(f"attack.restarts={restarts} must be >= 1")
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.random_start = bool(random_start)

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "steps": self.steps,
            "restarts": self.restarts,
            "random_start": self.random_start,
        }

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
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for restart in range(self.restarts):
            idx = (
                (~fooled).nonzero().flatten()
                if self.early_stop
                else torch.arange(x.shape[0], device=x.device)
            )
            if idx.numel() == 0:
                break
            self._restart(model, x, y, targets, eps, threat.norm, ctx, restart, idx, result, fooled)
        return result

    def _restart(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        targets: Tensor | None,
        eps: float,
        norm: str,
        ctx: PerturbContext,
        restart: int,
        idx: Tensor,
        result: Tensor,
        fooled: Tensor,
    ) -> None:
        """One APGD run on the samples ``idx``: first hits are recorded, misses end at their best point."""
        x0, ys = x.index_select(0, idx), y.index_select(0, idx)
        ts = targets.index_select(0, idx) if targets is not None else None
        if self.random_start:
            current = project(
                x0 + random_start(x, eps, norm, ctx, stream=restart).index_select(0, idx),
                x0,
                eps,
                norm,
                ctx.bounds,
            )
        else:
            current = x0.clone()
        grad, logits = self.gradient(model, current, ys, ts, ctx)
        value = objective(logits, ys, ts, self.loss).detach()
        record_first_hits(goal_reached(logits, ys, ts), current, idx, result, fooled)
        shape = (-1,) + (1,) * (x.dim() - 1)
        eta = torch.full((idx.numel(),), 2.0 * eps, device=x.device)
        best_x, best_value, best_grad = current.clone(), value.clone(), grad.clone()
        previous = current.clone()
        increases = torch.zeros(idx.numel(), device=x.device)
        marks = set(checkpoints(self.steps))
        last_mark, mark_eta, mark_best = 0, eta.clone(), best_value.clone()
        for k in range(self.steps - 1):
            z = project(current + eta.view(shape) * step_direction(grad, norm), x0, eps, norm, ctx.bounds)
            if k > 0:
                z = project(
                    current + MOMENTUM * (z - current) + (1 - MOMENTUM) * (current - previous),
                    x0,
                    eps,
                    norm,
                    ctx.bounds,
                )
            previous, current = current, z
            grad, logits = self.gradient(model, current, ys, ts, ctx)
            new_value = objective(logits, ys, ts, self.loss).detach()
            hit = goal_reached(logits, ys, ts)
            record_first_hits(hit, current, idx, result, fooled)
            increases += (new_value > value).float()
            better = new_value > best_value
            best_x[better], best_value[better], best_grad[better] = (
                current[better],
                new_value[better],
                grad[better],
            )
            value = new_value
            if k + 1 in marks:
                reduce = (increases < RHO * (k + 1 - last_mark)) | (
                    (mark_eta == eta) & (mark_best == best_value)
                )
                eta = torch.where(reduce, eta / 2, eta)
                current = torch.where(reduce.view(shape), best_x, current)
                grad = torch.where(reduce.view(shape), best_grad, grad)
                increases.zero_()
                last_mark, mark_eta, mark_best = k + 1, eta.clone(), best_value.clone()
            if self.early_stop and bool(hit.any()):
                keep = ~hit
                if not bool(keep.any()):
                    return
                idx, x0, ys, current, previous, grad, value, eta, increases = (
                    t[keep] for t in (idx, x0, ys, current, previous, grad, value, eta, increases)
                )
                best_x, best_value, best_grad, mark_eta, mark_best = (
                    t[keep] for t in (best_x, best_value, best_grad, mark_eta, mark_best)
                )
                ts = ts[keep] if ts is not None else None
        missed = ~fooled.index_select(0, idx)
        result[idx[missed]] = best_x[missed]
