"""PGD (Madry et al. 2018): iterated gradient steps projected onto the eps ball, with restarts.

Options: L-inf or L2, uniform random start, restarts, the step-size rule (absolute ``step_size``
or ``rel_step_size`` x eps / steps, Madry's 2.5 by default), cross-entropy or CW-margin loss,
targeted or untargeted (from the threat model), EOT through ``eot_samples``.

Every iterate is checked (the forward pass of its gradient step gives the logits for free): the
first one that reaches the goal is the sample's result (as AutoAttack keeps its best point), so PGD
never reports a sample robust because a later step wandered back; the final iterate is checked by
the base class. The logits of those first hits are handed to the base (``ctx.vouch``) on a
deterministic model without EOT or bf16, so the base does not run the same forward pass again:
for PGD-10 at a large eps that second pass was 5% of the whole cost.
With ``early_stop`` a fooled sample also leaves the batch, which saves work but changes no result:
the per-sample computation and its random start do not depend on the other samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from robustcnn.attacks.context import PerturbContext, goal_reached
from robustcnn.attacks.gradient import GradientAttack, GradientOptions, step_direction
from robustcnn.attacks.restarts import Restarts, SampleRows, optional_rows
from robustcnn.attacks.result import SettingValue
from robustcnn.errors import ConfigError
from robustcnn.threat import ThreatModel, project

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11+; only the type checker reads it


def random_start(x: Tensor, eps: float, norm: str, ctx: PerturbContext, stream: int) -> Tensor:
    """A uniform point of the eps ball (linf: the cube; l2: direction x radius ~ U^(1/d))."""
    shape = tuple(x.shape[1:])
    if norm == "linf":
        return (2 * ctx.random(shape, stream) - 1) * eps
    direction = ctx.random(shape, stream, kind="normal")
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * len(shape)))
    dims = math.prod(shape)
    radius = ctx.random((1,) * len(shape), stream + 10_000) ** (1.0 / dims) * eps
    return direction * radius


def start_point(
    x: Tensor, eps: float, norm: str, ctx: PerturbContext, stream: int, idx: Tensor | None = None
) -> Tensor:
    """A uniform random point of the eps ball around ``x`` (its rows ``idx``), inside the bounds.

    The noise is drawn for all of ``x`` and then indexed, so a sample starts at the same point
    whichever other samples a restart attacks.
    """
    noise = random_start(x, eps, norm, ctx, stream)
    if idx is None:
        return project(x + noise, x, eps, norm, ctx.bounds)
    x0 = x.index_select(0, idx)
    return project(x0 + noise.index_select(0, idx), x0, eps, norm, ctx.bounds)


@dataclass
class Iterates(SampleRows):
    """The samples one PGD restart still attacks, one row each (see :class:`SampleRows`)."""

    x0: Tensor  # their clean inputs: the centre of each eps ball
    y: Tensor
    targets: Tensor | None
    current: Tensor  # the current iterate
    grad: Tensor  # the objective's gradient at ``current``, set by each step before it is read


class PGDOptions(GradientOptions, total=False):
    """PGD's settings (its keywords and a gradient attack's), for a class that passes them on."""

    steps: int
    step_size: float | None
    rel_step_size: float
    random_start: bool
    restarts: int
    return_last: bool


class PGD(GradientAttack):
    name = "pgd"

    def __init__(
        self,
        *,
        steps: int = 40,
        step_size: float | None = None,
        rel_step_size: float = 2.5,
        random_start: bool = True,
        restarts: int = 1,
        return_last: bool = False,
        **kwargs: Unpack[GradientOptions],
    ) -> None:
        super().__init__(**kwargs)
        if int(steps) < 1:
            raise ConfigError(f"attack.steps={steps} must be >= 1")
        if int(restarts) < 1:
            raise ConfigError(f"attack.restarts={restarts} must be >= 1")
        if step_size is not None and not step_size > 0:
            raise ConfigError(f"attack.step_size={step_size} must be > 0 (or null to use rel_step_size)")
        if not rel_step_size > 0:
            raise ConfigError(f"attack.rel_step_size={rel_step_size} must be > 0")
        self.steps = int(steps)
        self.step_size = None if step_size is None else float(step_size)
        self.rel_step_size = float(rel_step_size)
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.return_last = bool(return_last)

    def params(self) -> dict[str, SettingValue]:
        return {
            **super().params(),
            "steps": self.steps,
            "step_size": self.step_size,
            "rel_step_size": self.rel_step_size,
            "random_start": self.random_start,
            "restarts": self.restarts,
            "return_last": self.return_last,
        }

    def alpha(self, eps: float) -> float:
        """Step size for radius eps: absolute when given, else rel_step_size * eps / steps."""
        return self.step_size if self.step_size is not None else self.rel_step_size * eps / self.steps

    def ascend(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float,
        norm: str,
        targets: Tensor | None,
        ctx: PerturbContext,
        alpha: float,
        stream: int = 0,
    ) -> Tensor:
        """All steps on every sample, the last iterate returned: the maximiser adversarial training needs.

        (An evaluation wants the first iterate that fools the model; training wants the point of
        highest loss, which usually lies beyond it.) One restart: training draws a fresh start per batch.
        """
        current = start_point(x, eps, norm, ctx, stream) if self.random_start else x.clone()
        for _ in range(self.steps):
            grad, _ = self.gradient(model, current, y, targets, ctx)
            current = project(current + alpha * step_direction(grad, norm), x, eps, norm, ctx.bounds)
        return current

    def perturb_stochastic(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float,
        norm: str,
        targets: Tensor | None,
        ctx: PerturbContext,
        alpha: float,
    ) -> Tensor:
        """A randomised model: every step of every restart runs, the last iterate is the candidate.

        An in-loop "success" is one random draw: stopping on it would hand back a point that the
        next draw classifies correctly (measured: PGD then looked weaker than FGSM). So no early
        stop inside a restart; a restart's end point is judged by one forward pass of the deployed
        model, and only the samples it did not fool get the next restart.
        """
        restarts = Restarts(x, self.restarts, early_stop=self.early_stop)
        for restart, idx in restarts:
            yi, ti = y.index_select(0, idx), optional_rows(targets, idx)
            # the samples idx with the random start they would get in the full batch
            current = self.ascend(
                model, x.index_select(0, idx), yi, eps, norm, ti, ctx.for_samples(idx), alpha, stream=restart
            )
            hit = goal_reached(ctx.logits(model, current), yi, ti)
            restarts.record_hits(hit, current, idx)
            restarts.keep_misses(current, idx)
        return restarts.result

    def walk(
        self,
        model: nn.Module,
        eps: float,
        norm: str,
        ctx: PerturbContext,
        alpha: float,
        restarts: Restarts,
        iterates: Iterates,
        *,
        check_last: bool,
    ) -> None:
        """One restart on the samples of ``iterates``: every iterate is checked, first hits recorded.

        The check of an iterate is the forward pass of its gradient step (free); with early stop a
        sample leaves at its first hit. The samples that never reach the goal report their last
        iterate. ``check_last``: check that last iterate here, because the next restart will not
        start from it (the very last one is checked by the base, which measures every candidate
        it gets back: a check here would be a second forward pass for the same answer).
        """
        for _step in range(self.steps):
            iterates.grad, log_probs, raw = self.gradient_and_logits(
                model, iterates.current, iterates.y, iterates.targets, ctx
            )
            if raw is not None:
                restarts.keep_logits(raw)
            hit = goal_reached(log_probs, iterates.y, iterates.targets)
            restarts.record_hits(hit, iterates.current, iterates.idx, raw)
            remaining = restarts.drop_finished(hit, iterates)
            if remaining is None:
                return
            iterates = remaining
            step = alpha * step_direction(iterates.grad, norm)
            iterates.current = project(iterates.current + step, iterates.x0, eps, norm, ctx.bounds)
        if check_last:
            logits = ctx.logits(model, iterates.current)
            hit = goal_reached(logits, iterates.y, iterates.targets)
            restarts.record_hits(hit, iterates.current, iterates.idx, logits)
        restarts.keep_misses(iterates.current, iterates.idx)

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
        alpha = self.alpha(eps)
        if self.return_last:
            return self.ascend(model, x, y, eps, threat.norm, targets, ctx, alpha)
        if getattr(model, "stochastic", False):
            return self.perturb_stochastic(model, x, y, eps, threat.norm, targets, ctx, alpha)
        restarts = Restarts(x, self.restarts, early_stop=self.early_stop)
        for restart, idx in restarts:
            x0 = x.index_select(0, idx)
            current = start_point(x, eps, threat.norm, ctx, restart, idx) if self.random_start else x0.clone()
            iterates = Iterates(
                idx=idx,
                x0=x0,
                y=y.index_select(0, idx),
                targets=optional_rows(targets, idx),
                current=current,
                grad=torch.zeros_like(current),
            )
            last = restart == self.restarts - 1
            self.walk(model, eps, threat.norm, ctx, alpha, restarts, iterates, check_last=not last)
        if restarts.logits is not None:
            # the logits of each first hit, so that the base need not run that forward pass again
            ctx.vouch(model, restarts.logits, restarts.fooled)
        return restarts.result
