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
from typing import Any

import torch
from torch import Tensor, nn

from robustcnn.attacks.base import PerturbContext, goal_reached, record_first_hits
from robustcnn.attacks.gradient import GradientAttack, step_direction
from robustcnn.errors import ConfigError
from robustcnn.threat import ThreatModel, project


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
        **kwargs: Any,
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

    def params(self) -> dict[str, Any]:
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
        current = x.clone()
        if self.random_start:
            current = project(x + random_start(x, eps, norm, ctx, stream=stream), x, eps, norm, ctx.bounds)
        for _ in range(self.steps):
            grad, _ = self.gradient(model, current, y, targets, ctx)
            current = project(current + alpha * step_direction(grad, norm), x, eps, norm, ctx.bounds)
        return current

    def restart_indices(self, fooled: Tensor) -> Tensor:
        """Samples a restart attacks: those not fooled yet (early stop) or all of them."""
        if self.early_stop:
            return (~fooled).nonzero().flatten()
        return torch.arange(fooled.shape[0], device=fooled.device)

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
        result = x.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for restart in range(self.restarts):
            idx = self.restart_indices(fooled)
            if idx.numel() == 0:
                break
            yi = y.index_select(0, idx)
            ti = targets.index_select(0, idx) if targets is not None else None
            current = self._ascend_on(idx, model, x, y, eps, norm, targets, ctx, alpha, restart)
            hit = goal_reached(ctx.logits(model, current), yi, ti)
            take = ~fooled.index_select(0, idx)
            result[idx[take]] = current[take]
            fooled[idx[hit & take]] = True
        return result

    def _ascend_on(
        self,
        idx: Tensor,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float,
        norm: str,
        targets: Tensor | None,
        ctx: PerturbContext,
        alpha: float,
        restart: int,
    ) -> Tensor:
        """``ascend`` on the samples ``idx`` with the random start they would get in the full batch."""
        sub = PerturbContext(
            device=ctx.device,
            eps_index=ctx.eps_index,
            batch_index=ctx.batch_index,
            full_batch=ctx.full_batch,
            active=ctx.active.index_select(0, idx),
            seed=ctx.seed,
            bounds=ctx.bounds,
            amp=ctx.amp,
            counters=ctx.counters,
        )
        ti = targets.index_select(0, idx) if targets is not None else None
        return self.ascend(
            model, x.index_select(0, idx), y.index_select(0, idx), eps, norm, ti, sub, alpha, stream=restart
        )

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
        result = x.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        # logits of each first hit, handed to the base so it need not run that forward pass again
        hit_logits: Tensor | None = None
        for restart in range(self.restarts):
            idx = self.restart_indices(fooled)
            if idx.numel() == 0:
                break
            x0 = x.index_select(0, idx)
            yi = y.index_select(0, idx)
            ti = targets.index_select(0, idx) if targets is not None else None
            if self.random_start:
                start = random_start(x, eps, threat.norm, ctx, stream=restart).index_select(0, idx)
                current = project(x0 + start, x0, eps, threat.norm, ctx.bounds)
            else:
                current = x0.clone()
            for _step in range(self.steps):
                grad, log_probs, raw = self.gradient_and_logits(model, current, yi, ti, ctx)
                if raw is not None and hit_logits is None:
                    hit_logits = raw.new_empty((x.shape[0], raw.shape[1]))
                hit = goal_reached(log_probs, yi, ti)
                record_first_hits(hit, current, idx, result, fooled, raw, hit_logits)
                if self.early_stop:
                    keep = ~hit
                    kept = int(keep.sum())  # one host sync per step, none per tensor
                    if kept == 0:
                        idx, current = idx[:0], current[:0]
                        break
                    if kept < keep.shape[0]:
                        idx, current, grad, x0, yi = idx[keep], current[keep], grad[keep], x0[keep], yi[keep]
                        ti = ti[keep] if ti is not None else None
                current = project(
                    current + alpha * step_direction(grad, threat.norm), x0, eps, threat.norm, ctx.bounds
                )
            if restart < self.restarts - 1 and idx.numel():
                # before the next restart overwrites it, the final iterate gets its check
                logits = ctx.logits(model, current)
                hit = goal_reached(logits, yi, ti)
                record_first_hits(hit, current, idx, result, fooled, logits, hit_logits)
            # the very last iterate is returned unchecked: the base measures success on every candidate
            # it gets back, so a check here would be a second forward pass for the same answer
            missed = ~fooled.index_select(0, idx)
            result[idx[missed]] = current[missed]
        if hit_logits is not None:
            ctx.vouch(model, hit_logits, fooled)
        return result
