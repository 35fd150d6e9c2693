"""APGD (Croce & Hein 2020, the first attack of AutoAttack): PGD without a step size to tune.

Each sample starts with step 2 eps and a momentum of 0.75; at checkpoints spaced as in the paper
(22%, then shrinking gaps) its step is halved, and it jumps back to its best point so far, when
fewer than 75% of the steps since the last checkpoint raised the objective or when neither the
step nor the best objective changed. This adapts to each sample's loss surface, which is where a
fixed-step PGD under-reports on adversarially trained models (benchmarks/audit_vs_autoattack.py
measures a PGD-40 against AutoAttack and the audit on an adversarially trained lenet5).

As in :class:`PGD`, the first iterate that reaches the goal is the sample's result and, with
``early_stop``, a fooled sample leaves the batch (it changes no result, only the cost).

:class:`APGDT` is AutoAttack's second attack, APGD-T: the same search run once per target class
(the classes the clean input ranks highest after the first), each maximising a targeted loss
(DLR by default) while any misclassification counts as success. Paired with APGD on cross-entropy
it is AutoAttack's loss pairing: a loss that saturates (CE) and a scale-invariant margin that
aims at the nearest classes one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from robustcnn.attacks.base import AttackOptions
from robustcnn.attacks.context import PerturbContext, goal_reached
from robustcnn.attacks.gradient import GradientAttack, GradientOptions, objective, step_direction
from robustcnn.attacks.pgd import start_point
from robustcnn.attacks.restarts import Restarts, SampleRows, optional_rows
from robustcnn.attacks.result import SettingValue
from robustcnn.errors import ConfigError
from robustcnn.threat import ThreatModel, project

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11+; only the type checker reads it

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


@dataclass
class Search(SampleRows):
    """The samples one APGD restart still attacks, one row each (see :class:`SampleRows`)."""

    x0: Tensor  # their clean inputs: the centre of each eps ball
    y: Tensor
    targets: Tensor | None  # the goal: reach these classes (None: any class but y)
    aim: Tensor | None  # the class the objective pulls towards (None: away from y)
    current: Tensor  # the current iterate ...
    previous: Tensor  # ... and the one before it (the momentum term)
    grad: Tensor  # the objective's gradient at ``current``
    value: Tensor  # the objective at ``current``
    eta: Tensor  # each sample's step size
    increases: Tensor  # steps since the last checkpoint that raised the objective
    best_x: Tensor  # each sample's best point so far, its objective and gradient
    best_value: Tensor
    best_grad: Tensor
    mark_eta: Tensor  # the step size and best objective at the last checkpoint
    mark_best: Tensor
    last_mark: int = 0  # the step of the last checkpoint

    def shape(self) -> tuple[int, ...]:
        """The shape that broadcasts a per-sample value over an image."""
        return (-1,) + (1,) * (self.current.dim() - 1)

    def checkpoint(self, step: int) -> None:
        """Halve the step, and go back to the best point, where progress since the last one stalled.

        Stalled: fewer than ``RHO`` of the steps raised the objective, or neither the step size nor
        the best objective changed since the last checkpoint (the paper's two conditions).
        """
        reduce = (self.increases < RHO * (step - self.last_mark)) | (
            (self.mark_eta == self.eta) & (self.mark_best == self.best_value)
        )
        self.eta = torch.where(reduce, self.eta / 2, self.eta)
        self.current = torch.where(reduce.view(self.shape()), self.best_x, self.current)
        self.grad = torch.where(reduce.view(self.shape()), self.best_grad, self.grad)
        self.increases.zero_()
        self.last_mark, self.mark_eta, self.mark_best = step, self.eta.clone(), self.best_value.clone()


class APGD(GradientAttack):
    name = "apgd"

    def __init__(
        self,
        *,
        steps: int = 100,
        restarts: int = 1,
        random_start: bool = True,
        **kwargs: Unpack[GradientOptions],
    ) -> None:
        super().__init__(**kwargs)
        if int(steps) < 2:
            raise ConfigError(f"attack.steps={steps} must be >= 2")
        if int(restarts) < 1:
            raise ConfigError(f"attack.restarts={restarts} must be >= 1")
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.random_start = bool(random_start)

    def params(self) -> dict[str, SettingValue]:
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
        restarts = Restarts(x, self.restarts, early_stop=self.early_stop)
        for restart, idx in restarts:
            search = self.begin(model, x, y, targets, targets, eps, threat.norm, ctx, restart, idx, restarts)
            self.search(model, search, eps, threat.norm, ctx, restarts)
        return restarts.result

    def begin(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        targets: Tensor | None,
        aim: Tensor | None,
        eps: float,
        norm: str,
        ctx: PerturbContext,
        restart: int,
        idx: Tensor,
        restarts: Restarts,
    ) -> Search:
        """The start of one restart on the samples ``idx``: its point is checked (a hit is kept).

        ``targets`` decide success (None: any wrong class), ``aim`` what the objective pulls towards.
        """
        x0, ys, ts = x.index_select(0, idx), y.index_select(0, idx), optional_rows(targets, idx)
        aims = optional_rows(aim, idx)
        current = start_point(x, eps, norm, ctx, restart, idx) if self.random_start else x0.clone()
        grad, logits = self.gradient(model, current, ys, aims, ctx)
        value = objective(logits, ys, aims, self.loss).detach()
        restarts.record_hits(goal_reached(logits, ys, ts), current, idx)
        eta = torch.full((idx.numel(),), 2.0 * eps, device=x.device)
        return Search(
            idx=idx,
            x0=x0,
            y=ys,
            targets=ts,
            aim=aims,
            current=current,
            previous=current.clone(),
            grad=grad,
            value=value,
            eta=eta,
            increases=torch.zeros(idx.numel(), device=x.device),
            best_x=current.clone(),
            best_value=value.clone(),
            best_grad=grad.clone(),
            mark_eta=eta.clone(),
            mark_best=value.clone(),
        )

    def search(
        self, model: nn.Module, search: Search, eps: float, norm: str, ctx: PerturbContext, restarts: Restarts
    ) -> None:
        """The steps of one restart: first hits are recorded, misses end at their best point."""
        marks = set(checkpoints(self.steps))
        for k in range(self.steps - 1):
            hit = self.advance(model, search, k, eps, norm, ctx, restarts)
            if k + 1 in marks:
                search.checkpoint(k + 1)
            remaining = restarts.drop_finished(hit, search)
            if remaining is None:
                return
            search = remaining
        restarts.keep_misses(search.best_x, search.idx)

    def advance(
        self,
        model: nn.Module,
        s: Search,
        k: int,
        eps: float,
        norm: str,
        ctx: PerturbContext,
        restarts: Restarts,
    ) -> Tensor:
        """Step ``k``: a gradient step with momentum (none on the first), checked; returns the hits.

        Counts the steps that raised the objective and keeps each sample's best point so far, which
        is what the next checkpoint decides on.
        """
        step = s.eta.view(s.shape()) * step_direction(s.grad, norm)
        z = project(s.current + step, s.x0, eps, norm, ctx.bounds)
        if k > 0:
            z = project(
                s.current + MOMENTUM * (z - s.current) + (1 - MOMENTUM) * (s.current - s.previous),
                s.x0,
                eps,
                norm,
                ctx.bounds,
            )
        s.previous, s.current = s.current, z
        s.grad, logits = self.gradient(model, s.current, s.y, s.aim, ctx)
        new_value = objective(logits, s.y, s.aim, self.loss).detach()
        hit = goal_reached(logits, s.y, s.targets)
        restarts.record_hits(hit, s.current, s.idx)
        s.increases += (new_value > s.value).float()
        better = new_value > s.best_value
        s.best_x[better], s.best_value[better], s.best_grad[better] = (
            s.current[better],
            new_value[better],
            s.grad[better],
        )
        s.value = new_value
        return hit


class APGDT(APGD):
    """APGD-T (Croce & Hein 2020, AutoAttack's second attack): APGD aimed at one class at a time.

    Untargeted threats: for each of the ``target_classes`` classes that the clean input ranks
    highest after the first (2nd, 3rd, ...), ``restarts`` runs of APGD maximise the targeted loss
    towards it (targeted DLR by default, as AutoAttack), on the samples no earlier class fooled;
    a sample counts as fooled by any wrong class. AutoAttack's standard version aims at 9 classes;
    the cost is ``target_classes x restarts x steps`` gradient passes per sample it cannot fool.
    A targeted threat fixes the target already: then this is APGD towards it.
    """

    name = "apgd_t"

    def __init__(
        self,
        *,
        target_classes: int = 9,
        steps: int = 100,
        restarts: int = 1,
        random_start: bool = True,
        loss: str = "dlr",
        eot_samples: int = 1,
        **kwargs: Unpack[AttackOptions],
    ) -> None:
        super().__init__(
            steps=steps,
            restarts=restarts,
            random_start=random_start,
            loss=loss,
            eot_samples=eot_samples,
            **kwargs,
        )
        if int(target_classes) < 1:
            raise ConfigError(f"attack.target_classes={target_classes} must be >= 1")
        self.target_classes = int(target_classes)

    def params(self) -> dict[str, SettingValue]:
        return {**super().params(), "target_classes": self.target_classes}

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
        if targets is not None:
            return super().perturb(model, x, y, eps, threat, targets, ctx)
        ranked = self.ranked_classes(model, x, ctx)
        # never more classes than there are other classes to aim at
        aims = min(self.target_classes, ranked.shape[1] - 1)
        restarts = Restarts(x, aims * self.restarts, early_stop=self.early_stop)
        for restart, idx in restarts:
            aim = ranked[:, 1 + restart // self.restarts]
            search = self.begin(model, x, y, None, aim, eps, threat.norm, ctx, restart, idx, restarts)
            self.search(model, search, eps, threat.norm, ctx, restarts)
        return restarts.result

    @staticmethod
    def ranked_classes(model: nn.Module, x: Tensor, ctx: PerturbContext) -> Tensor:
        """Every sample's classes by its clean logits, highest first (AutoAttack's choice of targets)."""
        with torch.no_grad(), ctx.autocast():
            logits = model(x).float()
        ctx.counters["forward"] += x.shape[0]
        return logits.argsort(1, descending=True)
