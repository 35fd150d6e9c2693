"""FGSM and PGD run by torchattacks (``attack.backend=torchattacks``), with our settings' meaning.

Why subclasses of our FGSM/PGD: they accept exactly the native settings (``build_attack`` reads the
accepted keys from the class hierarchy) and report the same ``params()``, so one config means one
attack whichever library runs it. Only ``perturb`` changes; the base still validates inputs,
re-measures success, checks and projects into the eps ball, and guards the model.

What torchattacks 3.5 supports, and therefore what this backend accepts:

* FGSM: L-inf only (torchattacks has no L2 FGSM); PGD: L-inf (``PGD``) and L2 (``PGDL2``);
* cross-entropy only: ``loss=margin`` is refused (use backend=native or art);
* ``eot_samples > 1`` only for L-inf PGD, through ``torchattacks.EOTPGD``;
* inputs in [0, 1]: torchattacks clamps to [0, 1] unconditionally, so other model bounds are refused.

Conventions aligned here rather than left to torchattacks' defaults:

* step size: ``alpha`` is our :meth:`PGD.alpha` (absolute ``step_size`` or ``rel_step_size`` x eps
  / steps), never torchattacks' 2/255 default;
* restarts: torchattacks has none; they are looped here and each sample keeps the first restart
  that reaches the goal (the rest keep the last restart's point), as native PGD does. Without a
  random start every restart would repeat the same computation, so one run is made;
* targeted: ``set_mode_targeted_by_label(quiet=True)`` with the base's targets as labels;
* random start: drawn by torchattacks from the global RNG, which is seeded from ``attack.seed``
  (batch, eps, restart) and restored afterwards. Note the L2 start differs in distribution from
  ours (radius ~ U(0, eps) instead of eps * U^(1/d)).

Known difference that remains: torchattacks returns the *last* PGD iterate, while native PGD keeps
the first iterate that reaches the goal, so native PGD can only be as strong or slightly stronger.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from robustcnn.attacks.backends.common import (
    CountedLogits,
    backend_seed,
    check_installed,
    import_library,
    preserved_model_state,
    seeded_rng,
)
from robustcnn.attacks.context import PerturbContext, goal_reached
from robustcnn.attacks.fgsm import FGSM
from robustcnn.attacks.gradient import GradientOptions
from robustcnn.attacks.pgd import PGD, PGDOptions
from robustcnn.attacks.restarts import Restarts, optional_rows
from robustcnn.errors import ConfigError
from robustcnn.threat import ThreatModel

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11+; only the type checker reads it

BACKEND = "torchattacks"
INSTALL = "pip install --no-deps torchattacks"


def _check_settings(attack: FGSM | PGD, *, eot_ok: bool) -> None:
    """Refuse, at config time, settings torchattacks cannot honour (instead of silently ignoring them)."""
    check_installed("torchattacks", INSTALL, BACKEND)
    if attack.loss != "ce":
        raise ConfigError(
            f"attack.loss={attack.loss} is not available with attack.backend=torchattacks: "
            f"its {attack.name.upper()} maximises cross-entropy only; use "
            "attack.backend=native or art"
        )
    if attack.eot_samples > 1 and not eot_ok:
        raise ConfigError(
            f"attack.eot_samples={attack.eot_samples} is not available for {attack.name} "
            "with attack.backend=torchattacks (it has EOT only for L-inf PGD); use "
            "attack.backend=native"
        )


def _check_bounds(ctx: PerturbContext) -> None:
    if tuple(ctx.bounds) != (0.0, 1.0):
        raise ConfigError(
            f"attack.backend=torchattacks clamps images to [0, 1] but the model's bounds are "
            f"{list(ctx.bounds)}; use attack.backend=native or art"
        )


#: Builds a torchattacks attack on a model (Any: torchattacks ships no type information).
LibraryAttackFactory = Callable[[nn.Module], Any]


def _run_library_attack(
    make: LibraryAttackFactory,
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    targeted: bool,
    ctx: PerturbContext,
) -> Tensor:
    """Build a torchattacks attack on a counted view of ``model`` and run it on one batch.

    ``make(net)`` builds the attack. Its constructor prints (instead of raising) when the model has
    no parameters, so stdout is captured while it runs and the device is set explicitly; the
    targeted mode is set with ``quiet=True`` so nothing is printed per batch.
    """
    net = CountedLogits(model, ctx)
    with preserved_model_state(model):
        with contextlib.redirect_stdout(io.StringIO()):
            attack = make(net)
        attack.set_device(x.device)
        if targeted:
            attack.set_mode_targeted_by_label(quiet=True)
        adv = attack(x, labels)
    return adv.detach().to(x.dtype)


class TorchattacksFGSM(FGSM):
    """FGSM computed by ``torchattacks.FGSM`` (L-inf, cross-entropy)."""

    backend = BACKEND
    norms = ("linf",)

    def __init__(self, **kwargs: Unpack[GradientOptions]) -> None:
        super().__init__(**kwargs)
        _check_settings(self, eot_ok=False)

    def check_call(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> tuple[float, float]:
        if threat.norm not in self.norms:
            raise ConfigError(
                f"fgsm with attack.backend=torchattacks supports only linf (torchattacks has "
                f"no {threat.norm} FGSM); use attack.backend=native or art"
            )
        return super().check_call(model, x, y, threat)

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
        _check_bounds(ctx)
        ta = import_library("torchattacks", INSTALL, BACKEND)
        labels = targets if targets is not None else y
        targeted = targets is not None
        return _run_library_attack(lambda net: ta.FGSM(net, eps=eps), model, x, labels, targeted, ctx)


class TorchattacksPGD(PGD):
    """PGD computed by ``torchattacks.PGD`` (L-inf), ``PGDL2`` (L2) or ``EOTPGD`` (L-inf with EOT)."""

    backend = BACKEND

    def __init__(self, **kwargs: Unpack[PGDOptions]) -> None:
        super().__init__(**kwargs)
        _check_settings(self, eot_ok=True)

    def check_call(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> tuple[float, float]:
        if self.eot_samples > 1 and threat.norm != "linf":
            raise ConfigError(
                f"attack.eot_samples={self.eot_samples} with threat.norm={threat.norm} is not "
                "available with attack.backend=torchattacks (EOTPGD is L-inf only); use "
                "attack.backend=native"
            )
        return super().check_call(model, x, y, threat)

    def _factory(self, ta: ModuleType, eps: float, norm: str) -> LibraryAttackFactory:
        settings = {
            "eps": eps,
            "alpha": self.alpha(eps),
            "steps": self.steps,
            "random_start": self.random_start,
        }
        if norm == "l2":
            return lambda net: ta.PGDL2(net, **settings)
        if self.eot_samples > 1:
            return lambda net: ta.EOTPGD(net, eot_iter=self.eot_samples, **settings)
        return lambda net: ta.PGD(net, **settings)

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
        _check_bounds(ctx)
        ta = import_library("torchattacks", INSTALL, BACKEND)
        make = self._factory(ta, eps, threat.norm)
        labels = targets if targets is not None else y
        # a restart attacks only the samples not fooled yet, whatever early_stop says: the library
        # draws its random start for the whole batch it gets, so adding fooled samples back would
        # change the other samples' noise. Without a random start every restart would repeat the
        # same computation, so one run is made.
        restarts = Restarts(x, self.restarts if self.random_start else 1, early_stop=True)
        for restart, idx in restarts:
            xi, li = x.index_select(0, idx), labels.index_select(0, idx)
            with seeded_rng(backend_seed(self.seed, ctx, restart), x.device):
                adv = _run_library_attack(make, model, xi, li, targets is not None, ctx)
            ti = optional_rows(targets, idx)
            hit = goal_reached(ctx.logits(model, adv), y.index_select(0, idx), ti)
            # every sample attacked takes this restart's point; one that reaches the goal keeps it
            restarts.record_hits(hit, adv, idx)
            restarts.keep_misses(adv, idx)
        return restarts.result
