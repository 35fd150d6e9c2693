"""Square attack (Andriushchenko et al., ECCV 2020): black-box random search with square updates.

Why it is here: a gradient-free attack is the standard check against gradient masking (a model that
resists PGD but falls to Square had obfuscated gradients, Athalye et al. 2018), and it needs nothing
but the model's scores, so it also runs on ``knowledge=black_box`` threat models.

The algorithm (paper, Alg. 1) keeps one current point per sample and proposes a change of one
random square window per query; a proposal is kept only if it increases the objective (the CW margin
by default, or cross-entropy), and a sample stops as soon as it reaches the attack's goal.

* L-inf: the start is vertical stripes of +-eps (one sign per column and channel); a proposal sets
  the perturbation inside the window to one random +-eps "color" per channel.
* L2: the start is the paper's grid of pseudo-Gaussian bumps (a 5x5 grid of ``min(H, W) // 5``
  blocks, each with a random sign per channel and a random orientation), scaled to norm eps; a
  proposal moves the perturbation mass of a second random window into the first one, adding a new
  bump there, and rescales the whole perturbation back to norm eps (paper, Alg. 3).
* The window side follows the paper's piecewise-constant schedule of ``p`` (the fraction of pixels
  changed), ``p_init`` halved at 10, 50, 200, 500, 1k, 2k, 4k, 6k and 8k of 10k iterations, rescaled
  to the query budget as in the reference code.

Deviations from the reference code, all made so the search is batched and reproducible:

* every random draw (window positions, colors, bump orientation) comes from ``ctx.random`` with one
  stream per iteration, drawn for the whole batch and indexed, so a sample's search does not depend
  on which other samples are attacked; positions are per sample (the reference shares the L2
  windows across the batch) and may touch the last row/column (the reference's ``randint(0, h - s)``
  never does);
* the reference re-draws an L-inf color until it changes the current point (a wasted query
  otherwise); here a proposal that would change nothing gets all its channel signs flipped instead,
  which always changes the window and needs no per-sample loop.

Budget: ``queries`` forward passes per sample and restart (one for the start, ``queries - 1``
proposals), counted in ``ctx.counters["forward"]``. With ``progress_window`` (margin or DLR loss,
whose zero is the decision boundary) a sample stops early when it cannot get there: every
``progress_window`` queries, if its objective, rising for the rest of the budget as fast as it did
over the last window, would still stay below zero, it reports its best point and leaves. Progress
only slows as the squares shrink, so the projection is optimistic and the samples given up are
those the remaining queries would not have moved across. With ``early_stop`` a sample that reached its
goal leaves the batch; without it every sample is queried for the whole budget (the plain
computation), which costs more but reports exactly the same per-sample results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from robustcnn.attacks.base import Attack, AttackOptions
from robustcnn.attacks.context import PerturbContext, goal_reached
from robustcnn.attacks.gradient import LOSSES, objective
from robustcnn.attacks.restarts import Restarts, SampleRows, optional_rows
from robustcnn.attacks.result import SettingValue
from robustcnn.config import config_int
from robustcnn.errors import ConfigError
from robustcnn.threat import ThreatModel

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11+; only the type checker reads it

#: The reference schedule: ``p = p_init / divisor`` while the iteration (out of 10,000) is <= bound.
P_SCHEDULE: tuple[tuple[int, int], ...] = (
    (10, 1),
    (50, 2),
    (200, 4),
    (500, 8),
    (1000, 16),
    (2000, 32),
    (4000, 64),
    (6000, 128),
    (8000, 256),
)
P_FINAL_DIVISOR = 512
#: A proposal whose pixels all differ from the current point by less than this changes nothing.
UNCHANGED_TOLERANCE = 1e-7


def p_selection(p_init: float, iteration: int, iterations: int) -> float:
    """Fraction of pixels a proposal changes at ``iteration`` of ``iterations`` (the paper's schedule).

    The reference schedule is written for 10,000 iterations; ``iteration`` is rescaled to that scale so
    a small budget still runs through every stage from large squares to small ones.
    """
    scaled = int(iteration / max(iterations, 1) * 10_000)
    for bound, divisor in P_SCHEDULE:
        if scaled <= bound:
            return p_init / divisor
    return p_init / P_FINAL_DIVISOR


def bump(rows: int, cols: int) -> Tensor:
    """The reference's pseudo-Gaussian rectangle: nested rings weighted 1/(k+1)^2, unit L2 norm.

    The reference adds ``1/(k+1)^2`` to the centred window of half-width ``k`` for every ``k``; a pixel
    at Chebyshev distance ``d`` from the centre therefore holds ``sum_{k>=d} 1/(k+1)^2``, computed
    here in closed form instead of the reference's loop.
    """
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols)
    rings = max(rows // 2 + 1, cols // 2 + 1)
    weights = 1.0 / (torch.arange(rings, dtype=torch.float64) + 1) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum of weights[d:]
    dist_r = (torch.arange(rows) - rows // 2).abs()
    dist_c = (torch.arange(cols) - cols // 2).abs()
    delta = tail[torch.maximum(dist_r[:, None], dist_c[None, :])]
    return (delta / delta.norm()).float()


def square_pattern(s: int) -> Tensor:
    """The paper's L2 update of side ``s``: a positive bump on the top half, a negative one below."""
    delta = torch.cat([bump(s // 2, s), -bump(s - s // 2, s)], dim=0)
    return delta / delta.norm()


def window_mask(rows: Tensor, cols: Tensor, size: int, height: int, width: int) -> Tensor:
    """Boolean [n, 1, H, W] mask of the ``size`` x ``size`` window at (rows[i], cols[i]) per sample."""
    ar_h = torch.arange(height, device=rows.device)
    ar_w = torch.arange(width, device=cols.device)
    in_rows = (ar_h >= rows[:, None]) & (ar_h < rows[:, None] + size)
    in_cols = (ar_w >= cols[:, None]) & (ar_w < cols[:, None] + size)
    return in_rows[:, None, :, None] & in_cols[:, None, None, :]


def window_index(rows: Tensor, cols: Tensor, size: int, channels: int) -> tuple[Tensor, ...]:
    """Advanced-indexing tuple that reads/writes each sample's window as an [n, C, s, s] block."""
    n = rows.shape[0]
    ar = torch.arange(size, device=rows.device)
    sample = torch.arange(n, device=rows.device)[:, None, None, None]
    channel = torch.arange(channels, device=rows.device)[None, :, None, None]
    r = (rows[:, None] + ar)[:, None, :, None]
    c = (cols[:, None] + ar)[:, None, None, :]
    return sample, channel, r, c


def positions(u: Tensor, size: int, extent: int) -> Tensor:
    """Uniform integer offsets in [0, extent - size] from uniforms in [0, 1)."""
    return (u * (extent - size + 1)).floor().long().clamp_(0, extent - size)


def signs(u: Tensor) -> Tensor:
    """+-1 with probability 1/2 each from uniforms in [0, 1)."""
    return torch.where(u < 0.5, -1.0, 1.0).to(u.dtype)


def l2_scale(delta: Tensor, eps: float) -> Tensor:
    """``delta`` rescaled to L2 norm eps per sample (a zero perturbation stays zero)."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (delta.dim() - 1)))
    return delta / norms * eps


@dataclass
class Proposals(SampleRows):
    """The samples one Square restart still attacks, one row each (see :class:`SampleRows`)."""

    xs: Tensor  # their clean inputs
    y: Tensor
    targets: Tensor | None
    best: Tensor  # the current point: the best proposal accepted so far
    value: Tensor  # the objective at ``best``
    done: Tensor  # the goal is reached
    mark: Tensor  # the objective at the start of the current progress window


class Square(Attack):
    """Square attack, L-inf and L2, untargeted or targeted; see the module docstring."""

    name = "square"
    uses_gradients = False

    def __init__(
        self,
        *,
        queries: int = 1000,
        p_init: float = 0.8,
        loss: str = "margin",
        restarts: int = 1,
        progress_window: int | None = None,
        **kwargs: Unpack[AttackOptions],
    ) -> None:
        super().__init__(**kwargs)
        if progress_window is not None:
            progress_window = config_int(
                progress_window, "attack.progress_window", minimum=1, hint=" (queries), or null"
            )
            if loss == "ce":
                raise ConfigError(
                    "attack.progress_window needs loss=margin or loss=dlr (zero at the decision boundary); "
                    "cross-entropy has no fixed level at the boundary"
                )
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise ConfigError(
                f"attack.queries={queries!r} must be an integer >= 1 (forward passes per sample and restart)"
            )
        if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0 < p_init <= 1:
            raise ConfigError(
                f"attack.p_init={p_init!r} must be in (0, 1]: the initial fraction of pixels "
                "a square changes (the paper uses 0.8 for L-inf, 0.1 on ImageNet L2)"
            )
        if loss not in LOSSES:
            raise ConfigError(f"attack.loss={loss!r} is unknown; choose one of {', '.join(LOSSES)}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ConfigError(f"attack.restarts={restarts!r} must be an integer >= 1")
        self.queries = int(queries)
        self.p_init = float(p_init)
        self.loss = loss
        self.restarts = int(restarts)
        self.progress_window = progress_window
        self._patterns: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    def params(self) -> dict[str, SettingValue]:
        return {
            **super().params(),
            "queries": self.queries,
            "p_init": self.p_init,
            "loss": self.loss,
            "restarts": self.restarts,
            "progress_window": self.progress_window,
        }

    # -- the search -----------------------------------------------------------------------------
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
        if x.dim() != 4:
            raise ConfigError(f"the square attack needs images [N, C, H, W], got shape {tuple(x.shape)}")
        restarts = Restarts(x, self.restarts, early_stop=self.early_stop)
        # each sample's best objective over the restarts: a miss reports its best point
        best_value = torch.full((x.shape[0],), float("-inf"), device=x.device)
        for restart, idx in restarts:
            state = self.begin(model, x, y, targets, eps, threat.norm, ctx, restart, idx, restarts)
            self.search(model, state, eps, threat.norm, ctx, restart, restarts, best_value)
        return restarts.result

    def begin(
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
        restarts: Restarts,
    ) -> Proposals:
        """The start of one restart on the samples ``idx`` (stripes or bumps), checked: one query."""
        xs, ys, ts = x.index_select(0, idx), y.index_select(0, idx), optional_rows(targets, idx)
        stream = self.first_stream(restart)
        if norm == "linf":
            best = self._linf_start(xs, eps, ctx, stream, idx)
        else:
            best = self._l2_start(xs, eps, ctx, stream, idx)
        logits = ctx.logits(model, best)
        done = goal_reached(logits, ys, ts)
        restarts.record_hits(done, best, idx)
        value = objective(logits, ys, ts, self.loss)
        return Proposals(
            idx=idx, xs=xs, y=ys, targets=ts, best=best, value=value, done=done, mark=value.clone()
        )

    def first_stream(self, restart: int) -> int:
        """Streams ``first .. first + queries - 1`` of the noise belong to ``restart``."""
        return restart * self.queries

    def search(
        self,
        model: nn.Module,
        state: Proposals,
        eps: float,
        norm: str,
        ctx: PerturbContext,
        restart: int,
        restarts: Restarts,
        best_value: Tensor,
    ) -> None:
        """The proposals of one restart: first hits are kept, misses report their best point."""
        stream = self.first_stream(restart)
        iterations = self.queries - 1
        for it in range(iterations):
            remaining = restarts.drop_finished(state.done, state)
            if remaining is None:
                return
            state = remaining
            p = p_selection(self.p_init, it, iterations)
            if norm == "linf":
                candidate = self._linf_step(state.xs, state.best, eps, p, ctx, stream + 1 + it, state.idx)
            else:
                candidate = self._l2_step(state.xs, state.best, eps, p, ctx, stream + 1 + it, state.idx)
            logits = ctx.logits(model, candidate)
            new_value = objective(logits, state.y, state.targets, self.loss)
            hit = goal_reached(logits, state.y, state.targets)
            restarts.record_hits(hit, candidate, state.idx)
            # keep a proposal only if it improves the objective (or reaches the goal, which with the CE
            # loss need not come with a higher CE): the paper's acceptance rule
            accept = (new_value > state.value) | hit
            state.best = torch.where(accept.view(-1, 1, 1, 1), candidate, state.best)
            state.value = torch.where(accept, new_value, state.value)
            state.done = state.done | hit
            if self.progress_window is not None and (it + 1) % self.progress_window == 0:
                kept = self.give_up(state, iterations - it - 1, restarts, best_value)
                if kept is None:
                    return
                state = kept
        self.report_misses(state, restarts, best_value)

    def give_up(
        self, state: Proposals, remaining: int, restarts: Restarts, best_value: Tensor
    ) -> Proposals | None:
        """End the search of the samples that cannot reach the boundary in ``remaining`` queries.

        Their objective, rising as fast as over the last window for every query left, stays below
        zero: they report their best point now. Returns the rest (None when none is left).
        """
        window = self.progress_window or 1  # (only called with a window)
        projected = state.value + (state.value - state.mark) * (remaining / window)
        hopeless = ~state.done & (projected < 0)
        state.mark = state.value.clone()
        if not bool(hopeless.any()):
            return state
        self.report_misses(state.rows(hopeless), restarts, best_value)
        left = ~hopeless
        return state.rows(left) if bool(left.any()) else None

    @staticmethod
    def report_misses(state: Proposals, restarts: Restarts, best_value: Tensor) -> None:
        """Samples that never reached the goal report their best point over the restarts."""
        better = state.value > best_value.index_select(0, state.idx)
        missed = restarts.keep_misses(state.best, state.idx, where=better)
        best_value[state.idx[missed]] = state.value[missed]

    # -- L-inf ----------------------------------------------------------------------------------
    def _linf_start(self, xs: Tensor, eps: float, ctx: PerturbContext, stream: int, idx: Tensor) -> Tensor:
        """Vertical stripes: one +-eps sign per column and channel (paper, Sec. 3.1)."""
        c, _, w = xs.shape[1:]
        u = ctx.random((c, 1, w), stream).index_select(0, idx)
        return (xs + eps * signs(u)).clamp(*ctx.bounds)

    def _linf_step(
        self, xs: Tensor, best: Tensor, eps: float, p: float, ctx: PerturbContext, stream: int, idx: Tensor
    ) -> Tensor:
        """Set one random window of side ``round(sqrt(p * H * W))`` to a random +-eps color per channel."""
        c, h, w = xs.shape[1:]
        s = min(max(round(math.sqrt(p * h * w)), 1), h, w)
        u = ctx.random((2 + c,), stream).index_select(0, idx)
        mask = window_mask(positions(u[:, 0], s, h), positions(u[:, 1], s, w), s, h, w)
        color = eps * signs(u[:, 2:]).view(-1, c, 1, 1)
        candidate = torch.where(mask, (xs + color).clamp(*ctx.bounds), best)
        # a proposal equal to the current point would waste a query: flip its colors, which always
        # changes every pixel of the window (x + eps and x - eps never clip to the same value)
        unchanged = (candidate - best).abs().flatten(1).amax(1) < UNCHANGED_TOLERANCE
        flipped = torch.where(mask & unchanged.view(-1, 1, 1, 1), (xs - color).clamp(*ctx.bounds), candidate)
        return flipped

    # -- L2 -------------------------------------------------------------------------------------
    def _pattern(self, s: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The s x s bump and its transpose on ``device`` (cached: s changes only a few times)."""
        key = (s, str(device))
        if key not in self._patterns:
            pattern = square_pattern(s).to(device)
            self._patterns[key] = (pattern, pattern.t().contiguous())
        return self._patterns[key]

    def _l2_start(self, xs: Tensor, eps: float, ctx: PerturbContext, stream: int, idx: Tensor) -> Tensor:
        """The paper's grid of bumps (random sign per channel and block, random orientation), norm eps."""
        n, c, h, w = xs.shape
        s = max(min(h, w) // 5, 1)
        rows, cols = h // s, w // s
        top, left = (h - rows * s) // 2, (w - cols * s) // 2
        u = ctx.random((c + 1, rows, cols), stream).index_select(0, idx)
        pattern, transposed = self._pattern(s, xs.device)
        flip = (u[:, c:] < 0.5)[..., None, None]  # [n, 1, rows, cols, 1, 1]
        blocks = torch.where(flip, transposed, pattern) * signs(u[:, :c])[..., None, None]
        grid = blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, c, rows * s, cols * s)
        delta = torch.zeros_like(xs)
        delta[:, :, top : top + rows * s, left : left + cols * s] = grid
        return (xs + l2_scale(delta, eps)).clamp(*ctx.bounds)

    def _l2_step(
        self, xs: Tensor, best: Tensor, eps: float, p: float, ctx: PerturbContext, stream: int, idx: Tensor
    ) -> Tensor:
        """Move the mass of window 2 into window 1 with a fresh bump there, then rescale to norm eps."""
        c, h, w = xs.shape[1:]
        s = max(round(math.sqrt(p * h * w)), 3)
        s = min(s + 1 if s % 2 == 0 else s, h, w)
        u = ctx.random((5 + c,), stream).index_select(0, idx)
        r1, c1 = positions(u[:, 0], s, h), positions(u[:, 1], s, w)
        r2, c2 = positions(u[:, 2], s, h), positions(u[:, 3], s, w)
        mask1, mask2 = window_mask(r1, c1, s, h, w), window_mask(r2, c2, s, h, w)
        delta = best - xs
        norm_window = (delta * mask1).square().sum((2, 3), keepdim=True).sqrt()  # [n, C, 1, 1]
        norm_image = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        norm_both = (delta * (mask1 | mask2)).square().sum((2, 3), keepdim=True).sqrt()
        pattern, transposed = self._pattern(s, xs.device)
        bumps = torch.where((u[:, 4] < 0.5).view(-1, 1, 1, 1), transposed, pattern)
        where1 = window_index(r1, c1, s, c)
        new = bumps * signs(u[:, 5:]).view(-1, c, 1, 1) + delta[where1] / (1e-10 + norm_window)
        # the window gets the mass of both windows plus the unused budget (spread over the channels)
        budget = ((eps**2 - norm_image.square()).clamp_min(0) / c + norm_both.square()).sqrt()
        new = new / new.square().sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12) * budget
        delta = delta.masked_fill(mask2, 0.0)
        delta[where1] = new
        return (xs + l2_scale(delta, eps)).clamp(*ctx.bounds)
