"""Adversarial training: PGD-AT (Madry et al. 2018), fast FGSM-AT (Wong et al. 2020) and TRADES.

All three are train-time hooks on the one training loop (:func:`robustcnn.training.loop.fit`): each
batch is replaced by (or augmented with) adversarial examples crafted on the fly against the
current weights. Why they live together: they share everything but the inner maximisation and
the loss, i.e. the settings (eps, norm, steps, step rule), their validation, the per-batch eps
warm-up and the bookkeeping, which :class:`AdversarialSettings` and :class:`AdversarialHook`
hold once.

The inner maximisation always runs inside :func:`~robustcnn.attacks.contract.attack_mode` (eval mode,
frozen parameters, verified), so the only backward pass that reaches the parameters is the one
the loop runs on the returned loss. The examples come from the attack code itself
(:meth:`PGD.ascend <robustcnn.attacks.pgd.PGD.ascend>`; FGSM with a random start is PGD with one
step of ``1.25 eps``), so training and evaluation cannot drift apart. TRADES maximises a KL
divergence rather than a classification loss; its ascent loop reuses ``project`` and
``step_direction`` and is the one piece of attack code defined here.

Catastrophic overfitting (Wong et al. 2020, section 2.3 of the literature notes) is watched by
:class:`CollapseGuard`: PGD accuracy of a fixed training batch at every epoch end, the best
checkpoint kept and restored.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.attacks.context import PerturbContext
from robustcnn.attacks.contract import attack_mode
from robustcnn.attacks.fgsm import FGSM
from robustcnn.attacks.gradient import step_direction
from robustcnn.attacks.pgd import PGD
from robustcnn.config import show
from robustcnn.defenses.base import Defense, JobFit, register_defense
from robustcnn.errors import ConfigError
from robustcnn.threat import NORMS, ThreatModel, project
from robustcnn.training.loop import TrainContext, TrainHook

#: TRADES starts its inner maximisation at x + TRADES_INIT_STD * N(0, 1), as the paper's code does
#: (at x itself the KL term has a zero gradient).
TRADES_INIT_STD = 0.001
ON_COLLAPSE = ("stop", "restore", "escalate", "continue")
#: Relative slack under which the warm-up counts as finished (float round-off of epochs x steps).
_WARMUP_TOLERANCE = 1e-9


def _finite(name: str, value: object) -> int | float:
    """A config value that is a finite int or float, or fail with the key's name."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"defense.{name}={show(value)} must be a number")
    if not math.isfinite(float(value)):  # before int(): int(inf) and int(nan) raise
        raise ConfigError(f"defense.{name}={value!r} must be finite")
    return value


def _number(name: str, value: object) -> float:
    """A config value as a float, or fail with the key's name (``float('abc')`` would not name it)."""
    return float(_finite(name, value))


def _whole_number(name: str, value: object) -> int:
    """A config value as an int (``3.0`` is accepted, ``2.5`` is not), or fail with the key's name."""
    number = _finite(name, value)
    if float(number) != int(number):
        raise ConfigError(f"defense.{name}={value!r} must be a whole number")
    return int(number)


@dataclass(frozen=True)
class AdversarialSettings:
    """The inner-maximisation settings every adversarial-training variant shares, validated once."""

    eps: float = 0.3
    norm: str = "linf"
    steps: int = 10
    #: Absolute step in pixel units; None = ``rel_step_size * eps / steps`` (Madry's rule).
    step_size: float | None = None
    rel_step_size: float = 2.5
    random_start: bool = True
    #: Epochs (may be fractional) over which eps rises linearly from ~0 to ``eps``, per batch.
    warmup_epochs: float = 0.0

    @classmethod
    def create(
        cls,
        *,
        eps: object,
        norm: object,
        steps: object,
        step_size: object,
        rel_step_size: object,
        random_start: object,
        warmup_epochs: object,
    ) -> AdversarialSettings:
        """Coerce raw config values (ints from YAML, strings) and validate them."""
        return cls(
            eps=_number("eps", eps),
            norm=str(norm).lower(),
            steps=_whole_number("steps", steps),
            step_size=None if step_size is None else _number("step_size", step_size),
            rel_step_size=_number("rel_step_size", rel_step_size),
            random_start=bool(random_start),
            warmup_epochs=_number("warmup_epochs", warmup_epochs),
        )

    def configured(self, raw: Mapping[str, object]) -> AdversarialSettings:
        """These settings with the config's values (``raw``, by field name) in their place, validated."""
        return AdversarialSettings.create(**{**self.params(), **raw})

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"defense.norm={self.norm!r} is unknown; choose one of {', '.join(NORMS)}")
        if self.eps < 0:
            raise ConfigError(f"defense.eps={self.eps} must be >= 0 (a radius in [0,1] pixel units)")
        if self.norm == "linf" and self.eps > 1:
            raise ConfigError(
                f"defense.eps={self.eps} is outside [0,1] for the linf norm; eps is in pixel units "
                "(MNIST 0.3, CIFAR-10 8/255 = 0.0314)"
            )
        if self.steps < 1:
            raise ConfigError(f"defense.steps={self.steps} must be >= 1")
        if self.step_size is not None and not self.step_size > 0:
            raise ConfigError(
                f"defense.step_size={self.step_size} must be > 0 (or null to use rel_step_size)"
            )
        if not self.rel_step_size > 0:
            raise ConfigError(f"defense.rel_step_size={self.rel_step_size} must be > 0")
        if self.warmup_epochs < 0:
            raise ConfigError(f"defense.warmup_epochs={self.warmup_epochs} must be >= 0 (0 = no warm-up)")

    def warmup_fraction(self, step: int, steps_per_epoch: int) -> float:
        """Share of ``eps`` used at global batch ``step`` (0-based): linear, 1.0 once warmed up.

        Batch ``step`` uses ``(step + 1) / (warmup_epochs * steps_per_epoch)``, so the first batch
        already sees a small eps and the last batch of the warm-up reaches the full one.
        """
        if self.warmup_epochs <= 0:
            return 1.0
        progress = (step + 1) / (self.warmup_epochs * max(steps_per_epoch, 1))
        return 1.0 if progress >= 1.0 - _WARMUP_TOLERANCE else progress

    def eps_at(self, step: int, steps_per_epoch: int) -> float:
        """The radius used at global batch ``step``."""
        return self.eps * self.warmup_fraction(step, steps_per_epoch)

    def alpha(self, eps: float) -> float:
        """Step size for radius ``eps`` (the same rule as :meth:`PGD.alpha`)."""
        return self.step_size if self.step_size is not None else self.rel_step_size * eps / self.steps

    def pgd(self, seed: int) -> PGD:
        """The PGD attack whose :meth:`~PGD.ascend` crafts the training examples."""
        return PGD(
            steps=self.steps,
            step_size=self.step_size,
            rel_step_size=self.rel_step_size,
            random_start=self.random_start,
            seed=seed,
        )

    def params(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "norm": self.norm,
            "steps": self.steps,
            "step_size": self.step_size,
            "rel_step_size": self.rel_step_size,
            "random_start": self.random_start,
            "warmup_epochs": self.warmup_epochs,
        }


class AdversarialHook(TrainHook, ABC):
    """A training hook that trains on examples crafted per batch; subclasses say how and on what loss.

    Shared here: the warm-up eps of the batch, a deterministic :class:`PerturbContext` per batch
    (noise seeded by the global step), the inner maximisation wrapped in ``attack_mode``, and the
    adversarial train accuracy (counted on the device, read once per epoch).
    """

    def __init__(self, settings: AdversarialSettings, seed: int) -> None:
        self.settings = settings
        self.seed = int(seed)
        self.history: list[dict[str, float]] = []
        self._correct: Tensor | None = None
        self._counted = 0
        self._clean_correct: Tensor | None = None

    # -- what subclasses write -------------------------------------------------------------------
    @abstractmethod
    def craft(self, ctx: TrainContext, x: Tensor, y: Tensor, eps: float, pctx: PerturbContext) -> Tensor:
        """The inner maximisation (runs in ``attack_mode``): adversarial examples inside the ball."""

    @abstractmethod
    def loss(self, ctx: TrainContext, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        """The outer loss of the batch (train mode, parameters live)."""

    # -- shared ----------------------------------------------------------------------------------
    def perturb_context(self, ctx: TrainContext, x: Tensor) -> PerturbContext:
        """Noise seeded by the global step, drawn for the whole batch (the same when it runs in pieces)."""
        full_batch, active = ctx.piece_rows(x)
        return PerturbContext(
            device=x.device,
            eps_index=0,
            batch_index=ctx.step,
            full_batch=full_batch,
            active=active,
            seed=self.seed,
            bounds=tuple(getattr(ctx.model, "bounds", (0.0, 1.0))),
            amp=ctx.config.amp,
        )

    def adversarial_batch(self, ctx: TrainContext, x: Tensor, y: Tensor) -> Tensor:
        """The batch's adversarial examples at this step's (warm-up) eps, detached."""
        eps = self.settings.eps_at(ctx.step, ctx.steps_per_epoch)
        if eps <= 0:
            return x
        # Stale gradients of the previous step would be cloned by attack_mode's check (a copy of
        # every parameter's gradient per batch); the loop zeroes them before backward anyway.
        ctx.optimizer.zero_grad(set_to_none=True)
        with attack_mode(ctx.model):
            x_adv = self.craft(ctx, x, y, eps, self.perturb_context(ctx, x))
        return x_adv.detach()

    def compute_loss(self, ctx: TrainContext, x: Tensor, y: Tensor) -> Tensor | None:
        return self.loss(ctx, x, self.adversarial_batch(ctx, x, y), y)

    def record(self, logits_adv: Tensor, y: Tensor, logits_clean: Tensor | None = None) -> None:
        """Count correct predictions on device tensors (no host sync per batch)."""
        hits = (logits_adv.detach().argmax(1) == y).sum()
        self._correct = hits if self._correct is None else self._correct + hits
        self._counted += y.shape[0]
        if logits_clean is not None:
            clean = (logits_clean.detach().argmax(1) == y).sum()
            self._clean_correct = clean if self._clean_correct is None else self._clean_correct + clean

    def batch_state(self) -> object:
        """The counts so far (tensors are replaced, never changed in place, so references suffice)."""
        return self._correct, self._counted, self._clean_correct

    def restore_batch_state(self, state: object) -> None:
        counts = cast(tuple[Tensor | None, int, Tensor | None], state)
        self._correct, self._counted, self._clean_correct = counts

    def on_fit_start(self, ctx: TrainContext) -> None:
        self.history = []
        self._correct, self._counted, self._clean_correct = None, 0, None

    def on_epoch_end(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        row = {
            "epoch": float(ctx.epoch + 1),
            "train_eps": self.settings.eps_at(max(ctx.step - 1, 0), ctx.steps_per_epoch),
        }
        if self._counted and self._correct is not None:
            row["adv_train_accuracy"] = float(self._correct.item()) / self._counted
            if self._clean_correct is not None:
                row["train_accuracy"] = float(self._clean_correct.item()) / self._counted
        self._correct, self._counted, self._clean_correct = None, 0, None
        self.history.append(row)
        metrics.update({k: v for k, v in row.items() if k != "epoch"})

    def summary(self) -> dict[str, Any]:
        """What the defense reports about this fit."""
        if not self.history:
            return {}
        last = self.history[-1]
        out: dict[str, Any] = {"final_train_eps": last["train_eps"]}
        for key in ("adv_train_accuracy", "train_accuracy"):
            if key in last:
                out[f"final_{key}"] = last[key]
        return out


class PGDTrainingHook(AdversarialHook):
    """Madry et al.: cross-entropy on the last PGD iterate (FGSM-AT: PGD with one step)."""

    def __init__(self, settings: AdversarialSettings, seed: int) -> None:
        super().__init__(settings, seed)
        self.attack = settings.pgd(seed)

    def escalate(self, steps: int) -> None:
        """Train on PGD-``steps`` (Madry's step rule, random start) from the next batch on.

        What fast training falls back to once the guard has seen the single step fail: a few PGD
        steps cost ``(steps + 1) / 2`` x an FGSM batch, not the ``(10 + 1) / 2`` of PGD-10.
        """
        self.settings = dataclasses.replace(
            self.settings, steps=steps, step_size=None, rel_step_size=2.5, random_start=True
        )
        self.attack = self.settings.pgd(self.seed)

    def craft(self, ctx: TrainContext, x: Tensor, y: Tensor, eps: float, pctx: PerturbContext) -> Tensor:
        return self.attack.ascend(
            ctx.model, x, y, eps, self.settings.norm, None, pctx, self.settings.alpha(eps)
        )

    def loss(self, ctx: TrainContext, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        with ctx.autocast():
            logits = ctx.model(x_adv).float()
        self.record(logits, y)
        return F.cross_entropy(logits, y)


def trades_ascent(
    model: nn.Module, x: Tensor, eps: float, norm: str, alpha: float, steps: int, pctx: PerturbContext
) -> Tensor:
    """TRADES' inner maximisation: projected steepest ascent on KL(f(x) || f(x')) over x' in the ball.

    Not :class:`PGD`: the objective compares two output distributions and needs no label. The
    clean distribution is computed once (the model is frozen and in eval mode, so it cannot change).
    Call inside ``attack_mode``.
    """
    with torch.no_grad(), pctx.autocast():
        target = F.softmax(model(x).float(), dim=1)
    noise = pctx.random(tuple(x.shape[1:]), kind="normal")
    current = project(x + TRADES_INIT_STD * noise, x, eps, norm, pctx.bounds)
    for _ in range(steps):
        current = current.detach().requires_grad_(True)
        with pctx.autocast():
            log_probs = F.log_softmax(model(current).float(), dim=1)
        value = F.kl_div(log_probs, target, reduction="sum")
        (grad,) = torch.autograd.grad(value, current)
        current = project(current.detach() + alpha * step_direction(grad, norm), x, eps, norm, pctx.bounds)
    pctx.counters["gradient"] += x.shape[0] * steps
    pctx.counters["forward"] += x.shape[0] * (steps + 1)
    return current.detach()


class TradesHook(AdversarialHook):
    """Zhang et al. 2019: ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (batch mean)."""

    def __init__(self, settings: AdversarialSettings, beta: float, seed: int) -> None:
        super().__init__(settings, seed)
        self.beta = beta

    def craft(self, ctx: TrainContext, x: Tensor, y: Tensor, eps: float, pctx: PerturbContext) -> Tensor:
        alpha = self.settings.alpha(eps)
        return trades_ascent(ctx.model, x, eps, self.settings.norm, alpha, self.settings.steps, pctx)

    def loss(self, ctx: TrainContext, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        # two forward passes, as the reference code does (BatchNorm sees each batch on its own)
        with ctx.autocast():
            logits = ctx.model(x).float()
            logits_adv = ctx.model(x_adv).float()
        self.record(logits_adv, y, logits)
        natural = F.cross_entropy(logits, y)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return natural + self.beta * robust


class CollapseGuard(TrainHook):
    """Catastrophic-overfitting guard (Wong et al. 2020): PGD accuracy on a fixed training batch.

    At every epoch end it measures PGD and FGSM accuracy of ``x_hold`` at the full training eps
    (also during the warm-up, so the curve is comparable from epoch to epoch and the best
    checkpoint is judged against the threat the model is trained for), adds them to the metrics and
    keeps the best checkpoint by PGD accuracy. A collapse is PGD accuracy more than ``drop`` below
    the best so far, or, once the warm-up is over, below ``ratio`` x FGSM accuracy (the model
    resists the single step it trains on but not the attack; during the warm-up a model trained at
    a smaller eps fails this test without having collapsed). ``on_collapse``: ``stop`` ends
    training; ``restore`` reloads the best checkpoint (weights and optimizer state) and trains on;
    ``escalate`` reloads the best checkpoint and calls ``escalate`` (the fast-training hook switches
    to a few PGD steps), once; later collapses are only logged (the stronger attack needs epochs to
    build robustness from the restored checkpoint). ``continue`` only logs. In every mode the best
    checkpoint is restored at the end of the fit.
    """

    def __init__(
        self,
        settings: AdversarialSettings,
        x_hold: Tensor,
        y_hold: Tensor,
        *,
        steps: int,
        drop: float,
        ratio: float,
        on_collapse: str,
        seed: int,
        escalate: Callable[[], str] | None = None,
    ) -> None:
        self.settings = settings
        #: Called on the first collapse when on_collapse="escalate"; returns what it switched to.
        self.escalate = escalate
        self.escalated_epoch: int | None = None
        self.x_hold, self.y_hold = x_hold, y_hold
        self.steps, self.drop, self.ratio, self.on_collapse = steps, drop, ratio, on_collapse
        self.seed = int(seed)
        self.history: list[dict[str, float]] = []
        self.collapses: list[dict[str, Any]] = []
        self.best_accuracy: float | None = None
        self.best_epoch: int | None = None
        self.kept_epoch: int | None = None
        self.restored = False
        self._best_model: dict[str, Tensor] | None = None
        self._best_optimizer: dict[str, Any] | None = None

    def evaluate(self, model: nn.Module, eps: float) -> tuple[float, float]:
        """(PGD accuracy, FGSM accuracy) of the fixed batch at ``eps``; same random start every epoch."""
        threat = ThreatModel(self.settings.norm, eps=(eps,))
        n = self.x_hold.shape[0]
        pgd = PGD(steps=self.steps, rel_step_size=2.5, random_start=True, seed=self.seed, batch_size=n)
        fgsm = FGSM(seed=self.seed, batch_size=n)
        pgd_accuracy = pgd.run(model, self.x_hold, self.y_hold, threat).robust_accuracy()[0]
        fgsm_accuracy = fgsm.run(model, self.x_hold, self.y_hold, threat).robust_accuracy()[0]
        return pgd_accuracy, fgsm_accuracy

    def on_fit_start(self, ctx: TrainContext) -> None:
        self.history, self.collapses = [], []
        self.best_accuracy = self.best_epoch = self.kept_epoch = None
        self.restored = False
        self.escalated_epoch = None
        self._best_model = self._best_optimizer = None

    def on_epoch_end(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        eps = self.settings.eps
        if eps <= 0:
            return
        epoch = ctx.epoch + 1
        pgd_accuracy, fgsm_accuracy = self.evaluate(ctx.model, eps)
        previous = self.history[-1]["guard_robust_accuracy"] if self.history else None
        row = {"epoch": epoch, "guard_eps": eps, "guard_robust_accuracy": pgd_accuracy}
        row["guard_fgsm_accuracy"] = fgsm_accuracy
        self.history.append(row)
        metrics.update({k: float(v) for k, v in row.items() if k != "epoch"})
        warmed_up = self.settings.warmup_fraction(max(ctx.step - 1, 0), ctx.steps_per_epoch) >= 1.0
        best_before, best_epoch_before = self.best_accuracy, self.best_epoch
        reason = None
        if best_before is not None and pgd_accuracy < best_before - self.drop:
            reason = f"PGD accuracy fell more than {self.drop} below the best ({best_before:.3f})"
        elif warmed_up and pgd_accuracy < self.ratio * fgsm_accuracy:
            reason = f"PGD accuracy below {self.ratio} x FGSM accuracy ({fgsm_accuracy:.3f})"
        # best by PGD accuracy even on a flagged epoch: a ratio-test collapse may still beat every
        # earlier checkpoint (e.g. the first epoch after the warm-up); restoring a worse one helps no one
        if self.best_accuracy is None or pgd_accuracy >= self.best_accuracy:
            self._snapshot(ctx, epoch, pgd_accuracy)
        if reason is None:
            return
        event = {
            "epoch": epoch,
            "reason": reason,
            "before": previous,
            "after": pgd_accuracy,
            "best_before": best_before,
            "best_epoch": best_epoch_before,
            "fgsm_accuracy": fgsm_accuracy,
            "action": self.on_collapse,
        }
        escalating = self.on_collapse == "escalate" and self.escalated_epoch is None
        if self.on_collapse == "escalate" and not escalating:
            # the stronger attack needs epochs to build robustness from the restored checkpoint;
            # reloading it again at every ratio-test failure would never let it
            event["action"] = "continue (already escalated)"
        elif escalating and self.escalate is not None:
            event["action"] = f"escalate: {self.escalate()}"
            self.escalated_epoch = epoch
            ctx.notes["escalated_epoch"] = epoch
        self.collapses.append(event)
        ctx.notes.setdefault("collapses", []).append(event)
        metrics["guard_collapse"] = 1.0
        if self.on_collapse == "stop":
            ctx.stop = True
        elif (self.on_collapse == "restore" or escalating) and self.best_epoch != epoch:
            self._load(ctx)

    def on_fit_end(self, ctx: TrainContext) -> None:
        last = int(self.history[-1]["epoch"]) if self.history else len(ctx.history)
        if self._best_model is not None and self.best_epoch != last:
            self._load(ctx)
            self.restored = True
        self.kept_epoch = self.best_epoch if self._best_model is not None else last
        ctx.notes["kept_epoch"] = self.kept_epoch
        ctx.notes["kept_guard_robust_accuracy"] = self.best_accuracy
        ctx.notes["checkpoint_restored"] = self.restored
        # the copies are no longer needed (they hold a model's and an optimizer's worth of memory)
        self._best_model = self._best_optimizer = None

    def _snapshot(self, ctx: TrainContext, epoch: int, accuracy: float) -> None:
        self.best_accuracy, self.best_epoch = accuracy, epoch
        self._best_model = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        self._best_optimizer = copy.deepcopy(ctx.optimizer.state_dict())

    def _load(self, ctx: TrainContext) -> None:
        assert self._best_model is not None and self._best_optimizer is not None
        ctx.model.load_state_dict(self._best_model)
        ctx.optimizer.load_state_dict(copy.deepcopy(self._best_optimizer))

    def summary(self) -> dict[str, Any]:
        return {
            "collapsed": bool(self.collapses),
            "collapse_epochs": [int(e["epoch"]) for e in self.collapses],
            "collapses": list(self.collapses),
            "kept_epoch": self.kept_epoch,
            "kept_guard_robust_accuracy": self.best_accuracy,
            "checkpoint_restored": self.restored,
            "escalated_epoch": self.escalated_epoch,
            "guard_robust_accuracy": [float(r["guard_robust_accuracy"]) for r in self.history],
        }


class _AdversarialDefense(Defense, ABC):
    """What the three variants share: settings, hook creation, report, adversarial fine-tuning.

    The shared settings (the fields of :class:`AdversarialSettings`) arrive as keywords under their
    config names and are validated once, into ``self.settings``; a variant only declares its own
    defaults (:attr:`defaults`) and the ones its method fixes (:attr:`fixed`), which it neither
    accepts nor reports.

    With ``base`` set the runner hands over the base defense's trained model and :meth:`post_train`
    fine-tunes it adversarially for ``finetune_epochs``; otherwise the hooks train from scratch and
    :meth:`post_train` only returns the report (stored with the cached weights).
    """

    #: This variant's values of the shared settings where the config gives none.
    defaults: ClassVar[AdversarialSettings] = AdversarialSettings()
    #: Shared settings the method fixes (to their value in :attr:`defaults`): refused, not reported.
    fixed: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        *,
        finetune_epochs: int = 1,
        base: str | Mapping[str, Any] | None = None,
        **settings: object,
    ) -> None:
        unexpected = sorted(set(settings) - self.keyword_settings())
        if unexpected:  # what Python says of a keyword missing from a signature
            raise TypeError(
                f"{type(self).__name__}.__init__() got an unexpected keyword argument {unexpected[0]!r}"
            )
        self.settings = self.defaults.configured(settings)
        super().__init__(base=base)
        self.finetune_epochs = _whole_number("finetune_epochs", finetune_epochs)
        if self.finetune_epochs < 1:
            raise ConfigError(f"defense.finetune_epochs={self.finetune_epochs} must be >= 1")
        self._hooks: list[TrainHook] = []

    @classmethod
    def keyword_settings(cls) -> frozenset[str]:
        """The shared settings this variant accepts: all of :class:`AdversarialSettings` but the fixed."""
        return frozenset(f.name for f in dataclasses.fields(AdversarialSettings)) - cls.fixed

    @abstractmethod
    def make_hooks(self, seed: int, x_train: Tensor, y_train: Tensor) -> list[TrainHook]:
        """The training hooks of this kind of adversarial training."""

    def hooks(self, seed: int, x_train: Tensor, y_train: Tensor) -> list[TrainHook]:
        self._hooks = self.make_hooks(seed, x_train, y_train)
        return list(self._hooks)

    def params(self) -> dict[str, Any]:
        shared = {k: v for k, v in self.settings.params().items() if k not in self.fixed}
        return {**super().params(), **shared, "finetune_epochs": self.finetune_epochs}

    def post_train(
        self,
        model: nn.Module,
        x_train: Tensor,
        y_train: Tensor,
        device: torch.device,
        fit: JobFit,
        seed: int,
    ) -> dict[str, Any]:
        if self.base is not None:
            fit(model, hooks=self.hooks(seed, x_train, y_train), epochs=self.finetune_epochs)
        return self.report()

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for hook in self._hooks:
            summary = getattr(hook, "summary", None)
            if summary is not None:
                out.update(summary())
        return out


@register_defense("pgd_at")
class PGDAdversarialTraining(_AdversarialDefense):
    """Madry et al. 2018: train on the last iterate of PGD-k from a random start.

    Settings: all of :class:`AdversarialSettings`, ``finetune_epochs`` and ``base``.
    """

    def make_hooks(self, seed: int, x_train: Tensor, y_train: Tensor) -> list[TrainHook]:
        return [PGDTrainingHook(self.settings, seed)]


@register_defense("fgsm_at")
class FastAdversarialTraining(_AdversarialDefense):
    """Wong, Rice, Kolter 2020: FGSM from a uniform random start, step 1.25 eps, with a collapse guard."""

    # one step from a random start: PGD-1, whose step rule gives alpha = rel_step_size * eps
    defaults = AdversarialSettings(steps=1, rel_step_size=1.25, random_start=True)
    fixed = frozenset({"steps", "random_start"})

    def __init__(
        self,
        *,
        guard_samples: int = 256,
        guard_steps: int = 10,
        collapse_drop: float = 0.2,
        collapse_ratio: float = 0.5,
        on_collapse: str = "escalate",
        escalate_steps: int = 3,
        **shared: Any,  # the shared settings, finetune_epochs, base: _AdversarialDefense checks them
    ) -> None:
        super().__init__(**shared)
        self.guard_samples = _whole_number("guard_samples", guard_samples)
        self.guard_steps = _whole_number("guard_steps", guard_steps)
        self.collapse_drop = _number("collapse_drop", collapse_drop)
        self.collapse_ratio = _number("collapse_ratio", collapse_ratio)
        self.on_collapse = str(on_collapse).lower()
        self.escalate_steps = _whole_number("escalate_steps", escalate_steps)
        if self.escalate_steps < 1:
            raise ConfigError(
                f"defense.escalate_steps={self.escalate_steps} must be >= 1 (PGD steps after a collapse)"
            )
        if self.guard_samples < 1:
            raise ConfigError(f"defense.guard_samples={self.guard_samples} must be >= 1")
        if self.guard_steps < 1:
            raise ConfigError(f"defense.guard_steps={self.guard_steps} must be >= 1")
        if not 0 < self.collapse_drop <= 1:
            raise ConfigError(
                f"defense.collapse_drop={self.collapse_drop} must be in (0, 1] (accuracy points)"
            )
        if not 0 <= self.collapse_ratio <= 1:
            raise ConfigError(f"defense.collapse_ratio={self.collapse_ratio} must be in [0, 1] (0 = off)")
        if self.on_collapse not in ON_COLLAPSE:
            raise ConfigError(
                f"defense.on_collapse={on_collapse!r} is unknown; choose one of {', '.join(ON_COLLAPSE)}"
            )

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "guard_samples": self.guard_samples,
            "guard_steps": self.guard_steps,
            "collapse_drop": self.collapse_drop,
            "collapse_ratio": self.collapse_ratio,
            "on_collapse": self.on_collapse,
            "escalate_steps": self.escalate_steps,
        }

    def make_hooks(self, seed: int, x_train: Tensor, y_train: Tensor) -> list[TrainHook]:
        generator = torch.Generator().manual_seed(int(seed) + 1)
        pick = torch.randperm(x_train.shape[0], generator=generator)[: self.guard_samples].to(x_train.device)
        trainer = PGDTrainingHook(self.settings, seed)

        def escalate() -> str:
            trainer.escalate(self.escalate_steps)
            return f"PGD-{self.escalate_steps} from here on"

        guard = CollapseGuard(
            self.settings,
            x_train.index_select(0, pick),
            y_train.index_select(0, pick),
            steps=self.guard_steps,
            drop=self.collapse_drop,
            ratio=self.collapse_ratio,
            on_collapse=self.on_collapse,
            seed=seed,
            escalate=escalate,
        )
        return [trainer, guard]


@register_defense("trades")
class Trades(_AdversarialDefense):
    """Zhang et al. 2019: natural CE plus beta x the KL between clean and adversarial predictions."""

    # TRADES starts at x + 0.001 N(0, 1), not uniformly in the ball
    defaults = AdversarialSettings(random_start=False)
    fixed = frozenset({"random_start"})

    def __init__(self, *, beta: float = 6.0, **shared: Any) -> None:  # shared: as fgsm_at's
        super().__init__(**shared)
        self.beta = _number("beta", beta)
        if self.beta < 0:
            raise ConfigError(f"defense.beta={self.beta} must be >= 0 (0 = standard training; paper: 1-10)")

    def params(self) -> dict[str, Any]:
        return {**super().params(), "beta": self.beta}

    def make_hooks(self, seed: int, x_train: Tensor, y_train: Tensor) -> list[TrainHook]:
        return [TradesHook(self.settings, self.beta, seed)]
