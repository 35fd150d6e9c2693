"""The Attack base class: one contract and its invariants, enforced for every attack.

``attack(model, x, y, threat) -> AttackResult`` evaluates a whole eps list in one call (foolbox
style). The base does everything that must be the same for every attack, so a subclass only
writes ``perturb`` (how to find a candidate inside one eps ball):

* inputs are validated before any work (range, finiteness, labels, model output shape);
* the model is put in eval mode and restored; parameter gradients are frozen while attacking
  and it is verified that none were accumulated;
* every candidate is checked against the eps ball and the bounds (a violation is a bug and
  raises) and then projected, so float round-off can never leave the ball;
* success is always measured by the base on the returned (projected) candidate, so an attack's
  own bookkeeping cannot inflate it: with a fresh forward pass, or, where the attack vouches for
  them (:meth:`PerturbContext.vouch`), with the deterministic model's own fp32 logits of exactly
  that tensor from the attack's gradient step (the same forward pass, not run twice);
* shortcuts that never change a reported number: a sample fooled at a smaller eps keeps that
  adversarial example at every larger eps (it lies inside the larger ball) and is not attacked
  again; samples the model already gets wrong are not attacked at all;
* a minimum-norm attack (FMN) searches each sample's smallest adversarial example once per batch
  (:meth:`Attack.search_smallest`); the base verifies every example with its own forward pass and
  hands the verified ones to ``perturb`` at each eps (:class:`SmallestFound`), so every eps is
  answered from one search and still checked, projected and measured like any other candidate.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypedDict, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.attacks.restarts import optional_rows
from robustcnn.batching import autocast_for, in_batches, is_out_of_memory, out_of_memory_error
from robustcnn.errors import ConfigError, RobustCNNError
from robustcnn.interrupts import raise_if_requested
from robustcnn.progress import progress_bar
from robustcnn.threat import ThreatModel, perturbation_norms, project

#: Slack allowed between an attack's raw output and the eps ball / bounds before projection.
BALL_TOLERANCE = 1e-4
BOUNDS_TOLERANCE = 1e-5


#: Sees every adversarial example an attack reports: (the clean batch, its reported examples, the eps).
#: Why: a check of the threat model must measure the images themselves, not the norms the base
#: recorded (evaluation/checks.py, ``ThreatWitness``).
ExampleInspector = Callable[[Tensor, Tensor, float], None]


#: A setting's value: what ``params()`` reports and what ``with_`` changes (numbers, flags, names).
SettingValue = bool | int | float | str | None


class AttackInvariantError(RobustCNNError):
    """An attack broke its contract (left the eps ball or bounds, touched parameters): a bug."""

    exit_code = 3


@dataclass
class AttackResult:
    """Per-eps, per-sample outcome of one attack on one batch of samples (tensors on the CPU)."""

    name: str
    threat: ThreatModel
    params: dict[str, SettingValue]
    clean_correct: Tensor  # bool [N]
    success: Tensor  # bool [E, N]: the attack's goal reached (untargeted: misclassified)
    correct: Tensor  # bool [E, N]: the model still predicts the true label
    norms: Tensor  # float [E, N]: norm of the reported adversarial example's perturbation
    true_prob_clean: Tensor  # float [N]: softmax probability of the true class on clean input
    true_prob_adv: Tensor  # float [E, N]: the same on the reported adversarial example
    clean_examples: Tensor  # [k, C, H, W]: the first k clean images
    adv_examples: Tensor  # [E, k, C, H, W]: their reported adversarial examples
    seconds: float = 0.0
    forward_passes: int = 0
    gradient_passes: int = 0
    #: float [N]: a minimum-norm attack's smallest verified adversarial perturbation per sample (inf
    #: where its search found none, 0 where the model is wrong on clean input); None for other attacks
    min_norms: Tensor | None = None
    #: long [N]: where this result's samples sit among the images of the caller that chose them (a
    #: battery's probe run on selected samples); None: they are the caller's first N
    rows: Tensor | None = None

    @property
    def eps(self) -> tuple[float, ...]:
        return self.threat.eps

    @property
    def n(self) -> int:
        return int(self.clean_correct.shape[0])

    def robust_accuracy(self) -> list[float]:
        return [float(v) for v in self.correct.float().mean(1)]

    def success_rate(self) -> list[float]:
        """Attack success rate among the samples the model classified correctly on clean input."""
        base = self.clean_correct
        if not bool(base.any()):
            return [float("nan")] * len(self.eps)
        return [float(v) for v in (self.success & base).float().sum(1) / base.float().sum()]

    def norm_stats(self) -> dict[str, list[float]]:
        """Mean / median perturbation norm of the successful examples (among clean-correct samples)."""
        means, medians = [], []
        for e in range(len(self.eps)):
            picked = self.norms[e][self.success[e] & self.clean_correct]
            means.append(float(picked.mean()) if picked.numel() else float("nan"))
            medians.append(float(picked.median()) if picked.numel() else float("nan"))
        return {"mean": means, "median": medians}

    def minimal_norms(self) -> Tensor:
        """Per sample, the smallest perturbation norm shown to make the model wrong (float [N]).

        An upper bound on the sample's true minimal perturbation, from every example reported wrong
        at any eps and, for a minimum-norm attack, from its search: 0 where the model is wrong on
        clean input, inf where nothing was found. A robust accuracy at eps is (up to the evidence
        of other attacks) the fraction of samples whose value exceeds eps.
        """
        shown = torch.where(self.correct, torch.full_like(self.norms, math.inf), self.norms).amin(0)
        if self.min_norms is not None:
            shown = torch.minimum(shown, self.min_norms)
        return torch.where(self.clean_correct, shown, torch.zeros_like(shown))

    def confidence_drop(self) -> list[float]:
        """Mean drop of the true-class probability, clean -> adversarial, on clean-correct samples."""
        base = self.clean_correct
        if not bool(base.any()):
            return [float("nan")] * len(self.eps)
        drop = self.true_prob_clean.unsqueeze(0) - self.true_prob_adv
        return [float(v) for v in drop[:, base].mean(1)]

    def images_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class SmallestFound:
    """A minimum-norm attack's verified smallest adversarial examples, one row per sample.

    ``examples`` are what the base measured (a sample without a verified example has its clean
    input), ``logits`` the base's own fp32 forward pass on exactly them, ``norms`` their perturbation
    norms (inf: none found). An attack answers an eps from these rows (:attr:`PerturbContext.smallest`).
    """

    examples: Tensor
    logits: Tensor
    norms: Tensor

    def rows(self, idx: Tensor) -> SmallestFound:
        return SmallestFound(*(t.index_select(0, idx) for t in (self.examples, self.logits, self.norms)))


@dataclass
class PerturbContext:
    """What ``perturb`` gets besides the tensors: deterministic noise, forward helpers, counters."""

    device: torch.device
    eps_index: int
    batch_index: int
    full_batch: int  # size of the batch before inactive samples were dropped
    active: Tensor  # long [n]: positions of the attacked samples inside the full batch
    seed: int
    bounds: tuple[float, float] = (0.0, 1.0)
    amp: bool = False
    counters: dict[str, int] = field(default_factory=lambda: {"forward": 0, "gradient": 0})
    #: Logits an attack already computed for some of the candidates it returns (see :meth:`vouch`).
    known_logits: Tensor | None = None
    known: Tensor | None = None
    known_model: nn.Module | None = None
    #: A minimum-norm attack's verified examples of the attacked samples (None for other attacks).
    smallest: SmallestFound | None = None

    def amp_active(self) -> bool:
        """bf16 autocast is really on (CUDA only): logits computed under it are not the fp32 answer."""
        return self.amp and self.device.type == "cuda"

    def vouch(self, model: nn.Module, logits: Tensor, known: Tensor) -> None:
        """Hand the base ``model``'s fp32 logits of the returned candidates where ``known`` is True.

        Why: an iterative attack checks every iterate with the forward pass of its gradient step,
        so for the candidates it returns the base's re-measurement is a second identical forward
        pass (for PGD-10 at a large eps, 5% of the whole cost). Only what the base would compute
        itself may be vouched for: the deterministic model's plain fp32 output on exactly the
        returned tensor (not an EOT average, not a bf16 pass, not a surrogate's output). The base
        re-measures every row that is not vouched for or that its projection changes by a bit.
        """
        self.known_logits, self.known, self.known_model = logits, known, model

    def random(self, shape: tuple[int, ...], stream: int = 0, kind: str = "uniform") -> Tensor:
        """Noise for the attacked samples that does not depend on which other samples are attacked.

        Drawn for the full batch from a generator seeded by (seed, batch, eps, stream) and then
        indexed, so the plain computation and the shortcut one see identical noise per sample.
        """
        generator = torch.Generator(device=self.device)
        generator.manual_seed(hash((self.seed, self.batch_index, self.eps_index, stream)) & 0x7FFF_FFFF_FFFF)
        full_shape = (self.full_batch, *shape)
        if kind == "normal":
            full = torch.randn(full_shape, generator=generator, device=self.device)
        else:
            full = torch.rand(full_shape, generator=generator, device=self.device)
        return full.index_select(0, self.active)

    def for_samples(self, idx: Tensor) -> PerturbContext:
        """The context of the samples ``idx`` of this one: the same noise per sample, shared counters."""
        return PerturbContext(
            device=self.device,
            eps_index=self.eps_index,
            batch_index=self.batch_index,
            full_batch=self.full_batch,
            active=self.active.index_select(0, idx),
            seed=self.seed,
            bounds=self.bounds,
            amp=self.amp,
            counters=self.counters,
        )

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return autocast_for(self.device, self.amp)

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        """Forward pass without gradients (counted)."""
        self.counters["forward"] += x.shape[0]
        with torch.no_grad(), self.autocast():
            return model(x).float()


def goal_reached(logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
    """Untargeted: the prediction differs from the label; targeted: it equals the target."""
    pred = logits.argmax(1)
    return pred == targets if targets is not None else pred != y


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters while attacking; both restored afterwards, and verified."""
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads_before = [None if p.grad is None else p.grad.clone() for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    if any(gradient_changed(before, p.grad) for p, before in zip(params, grads_before, strict=True)):
        raise AttackInvariantError("an attack accumulated gradients into the model's parameters")


def gradient_changed(before: Tensor | None, after: Tensor | None) -> bool:
    """A parameter's ``.grad`` appeared, vanished or changed."""
    if before is None or after is None:
        return (before is None) != (after is None)
    return not torch.equal(before, after)


def validate_inputs(model: nn.Module, x: Tensor, y: Tensor, bounds: tuple[float, float]) -> None:
    """Reject bad inputs before any work, each with the problem and the fix."""
    if x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"images {tuple(x.shape)} and labels {tuple(y.shape)} do not match; "
            "pass x as [N, C, H, W] and y as [N]"
        )
    if not torch.is_floating_point(x):
        raise ConfigError(f"images must be floating point in [0,1], got dtype {x.dtype}; divide uint8 by 255")
    if not bool(torch.isfinite(x).all()):
        raise ConfigError("images contain NaN or infinite values; clean the input before attacking")
    lo, hi = float(x.min()), float(x.max())
    if lo < bounds[0] - BOUNDS_TOLERANCE or hi > bounds[1] + BOUNDS_TOLERANCE:
        raise ConfigError(
            f"images lie in [{lo:.3g}, {hi:.3g}] but the model's bounds are {list(bounds)}; "
            "attacks take raw images (the Classifier normalizes them itself)"
        )
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ConfigError(f"labels must be integers, got dtype {y.dtype}")
    num_classes = getattr(model, "num_classes", None)
    with torch.no_grad():
        out = model(x[:2])
    if out.dim() != 2 or out.shape[0] != min(2, x.shape[0]):
        raise ConfigError(
            f"the model returns shape {tuple(out.shape)} for 2 images; it must return logits [N, classes]"
        )
    num_classes = num_classes or out.shape[1]
    if out.shape[1] != num_classes:
        raise ConfigError(f"the model returns {out.shape[1]} logits but declares {num_classes} classes")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ConfigError(
            f"labels lie in [{int(y.min())}, {int(y.max())}] but the model has {num_classes} "
            "classes; labels must be 0..classes-1"
        )


def input_bounds(model: nn.Module) -> tuple[float, float]:
    """The pixel range the model takes (a :class:`Classifier` declares it; [0, 1] otherwise)."""
    low, high = getattr(model, "bounds", (0.0, 1.0))
    return (low, high)


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters of ``cls``'s constructor through its bases (most derived first), by name.

    A subclass that only passes ``**kwargs`` on (a library backend) adds nothing, so it has exactly
    the settings of the class it extends.
    """
    found: dict[str, inspect.Parameter] = {}
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
                found.setdefault(p.name, p)
    return found


class AttackOptions(TypedDict, total=False):
    """The settings every attack takes (:class:`Attack`'s keywords), passed on by a subclass."""

    batch_size: int
    seed: int
    early_stop: bool
    keep_examples: int
    amp: bool


AttackT = TypeVar("AttackT", bound="Attack")


class Attack(ABC):
    """Base of every attack. Subclasses set ``name`` and implement :meth:`perturb`."""

    #: What the attack reports under; an instance may carry its own (``with_(name=...)``).
    name: str = "attack"
    #: False for attacks that only query predictions (noise, Square): usable on black-box models.
    uses_gradients: ClassVar[bool] = True
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    #: The library that computes the attack (native = our own torch code).
    backend: ClassVar[str] = "native"
    #: Show a bar over the attack's batches (the battery turns it on when a person watches).
    progress: bool = False
    #: Use the logits an attack vouches for instead of a second forward pass (tests turn it off to
    #: show that it changes no number).
    reuse_vouched_logits: bool = True
    #: A minimum-norm attack: it searches each sample's smallest adversarial example once per batch
    #: (:meth:`search_smallest`) and answers every eps from the verified result.
    minimum_norm: ClassVar[bool] = False

    def __init__(
        self,
        *,
        batch_size: int = 256,
        seed: int = 0,
        early_stop: bool = True,
        keep_examples: int = 8,
        amp: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"attack.batch_size={batch_size} must be >= 1")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.early_stop = bool(early_stop)
        self.keep_examples = int(keep_examples)
        self.amp = bool(amp)

    # -- what subclasses write -------------------------------------------------------------------
    @abstractmethod
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
        """Return one candidate per sample inside the eps ball around ``x`` (and inside [0,1])."""

    def search_smallest(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        targets: Tensor | None,
        ctx: PerturbContext,
    ) -> Tensor:
        """A minimum-norm attack's search: each sample's smallest adversarial example (any radius).

        Called once per batch, before any eps, on the samples the model gets right; what comes back
        must lie inside the bounds, and the base keeps a row only if its own forward pass finds it
        reaches the goal. Only attacks with ``minimum_norm`` implement it.
        """
        raise NotImplementedError(f"attack {self.name} is no minimum-norm attack")

    def params(self) -> dict[str, SettingValue]:
        """The settings that define this attack (logged, shown in reports and ``repr``)."""
        return {
            "backend": self.backend,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "early_stop": self.early_stop,
        }

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"

    # -- variants --------------------------------------------------------------------------------
    def settings(self) -> dict[str, SettingValue]:
        """The constructor's keyword arguments that rebuild this attack, read back from it.

        Every setting is stored under its own name (a test holds each registered attack to that).
        """
        return {key: getattr(self, key) for key in constructor_parameters(type(self))}

    @classmethod
    def native_class(cls) -> type[Attack]:
        """The class whose constructor defines the settings: ``cls``, or the attack a backend runs."""
        return next(c for c in cls.__mro__ if issubclass(c, Attack) and c.backend == "native")

    def with_(self: AttackT, **changes: SettingValue) -> AttackT:
        """A new attack equal to this one except for ``changes``; this one is left as it was.

        Why: the battery derives variants (an EOT version, a stronger probe) from attacks that
        belong to its caller, who may run them again. ``changes`` are settings (``steps``,
        ``restarts``, ``eot_samples``, ``seed``, ...) and ``name``, the name the variant reports
        under. A name the attack does not have is refused; values are checked and normalised by
        the native attack's constructor (the same ranges and errors as a config). Everything that
        is no setting is carried over: a bound surrogate, the progress flag, the name unless given.

        What only a library backend refuses (EOT with ART, or with torchattacks' FGSM) is not
        re-checked, so that the battery derives exactly the variants it derived before; such a
        variant runs without EOT, a known gap left for the battery to decide.
        """
        name = changes.pop("name", None)
        settings = self.settings()
        unknown = sorted(set(changes) - set(settings))
        if unknown:
            raise ConfigError(
                f"attack {self.name} has no setting(s) {unknown} to change; "
                f"accepted: {sorted({'name', *settings})}"
            )
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"attack {self.name}: the name of a variant must be a string, got {name!r}")
        # Any: keywords chosen by name at run time cannot be matched to parameters by mypy; the
        # constructor checks each one
        keywords: dict[str, Any] = {**settings, **changes}
        checked = self.native_class()(**keywords)
        variant = copy.copy(self)
        for key in changes:
            setattr(variant, key, getattr(checked, key))
        if name is not None:
            variant.name = name
        return variant

    # -- the contract ---------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> AttackResult:
        return self.run(model, x, y, threat)

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        *,
        inspector: ExampleInspector | None = None,
    ) -> AttackResult:
        """Attack ``x`` at every eps of ``threat``, in batches (halved when memory runs out).

        ``inspector`` is shown every reported adversarial example (all samples, every eps), with its
        clean image and eps; a batch redone after running out of memory is shown again.
        """
        bounds = self.check_call(model, x, y, threat)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        show = self.progress and x.shape[0] > self.batch_size
        slices = _Slices(
            self,
            model,
            x,
            y.long(),
            threat,
            bounds,
            device,
            progress_bar(x.shape[0], f"attack {self.name}", show, unit="img"),
            inspector=inspector,
        )
        start = time.perf_counter()
        with attack_mode(model):
            # the batch size is halved for this call only: a later call (another model) may fit
            parts = in_batches(
                slices,
                x.shape[0],
                self.batch_size,
                what=f"attack {self.name}",
                setting=f"attack.{type(self).name}.batch_size (or eval.attack_batch_size)",
            )
        if slices.bar is not None:
            slices.bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return self.merge(threat, x, parts, slices.counters, time.perf_counter() - start)

    def check_call(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> tuple[float, float]:
        """Refuse what cannot be attacked before any work; returns the model's input bounds."""
        if threat.norm not in self.norms:
            raise ConfigError(f"attack {self.name} supports the norms {self.norms}, not {threat.norm!r}")
        if x.shape[0] == 0:
            raise ConfigError("no images to attack; check data.max_test / eval.max_samples")
        bounds = input_bounds(model)
        with attack_mode(model):  # eval mode: validation must not touch BatchNorm statistics
            try:
                validate_inputs(model, x, y, bounds)
            except RuntimeError as exc:
                if is_out_of_memory(exc):  # two images (the shape probe) already do not fit
                    raise out_of_memory_error(f"attack {self.name}", 2) from exc
                raise
        threat.check_input_size(tuple(x.shape[1:]))
        return bounds

    def merge(
        self,
        threat: ThreatModel,
        x: Tensor,
        parts: list[dict[str, Tensor]],
        counters: dict[str, int],
        seconds: float,
    ) -> AttackResult:
        """One :class:`AttackResult` from the batches' parts (in order)."""
        merged = {
            key: torch.cat([p[key] for p in parts], dim=0 if key in _SAMPLE_FIRST else 1)
            for key in parts[0]
            if key != "adv_examples"
        }
        kept = [p["adv_examples"] for p in parts if "adv_examples" in p]
        k = min(self.keep_examples, x.shape[0])
        return AttackResult(
            name=self.name,
            threat=threat,
            params=self.params(),
            clean_correct=merged["clean_correct"],
            success=merged["success"],
            correct=merged["correct"],
            norms=merged["norms"],
            true_prob_clean=merged["true_prob_clean"],
            true_prob_adv=merged["true_prob_adv"],
            clean_examples=x[:k].detach().cpu(),
            adv_examples=torch.cat(kept, dim=1) if kept else torch.empty(0),
            seconds=seconds,
            forward_passes=counters["forward"],
            gradient_passes=counters["gradient"],
            min_norms=merged.get("min_norms"),
        )

    def measure(self, model: nn.Module, candidate: Tensor, raw: Tensor, ctx: PerturbContext) -> Tensor:
        """fp32 logits of the (projected) candidates: a fresh forward pass, except where vouched for.

        A vouched row is reused only if the attack vouched with this very model and the projection
        left the row bit-identical, so the logits are the model's output on the reported example
        itself (computed in the attack's working batch: as with any batch size, the backend's
        kernels may round differently in the last bits; tests assert that no reported number moves).
        """
        known, known_logits = ctx.known, ctx.known_logits
        reuse = None
        if (
            self.reuse_vouched_logits
            and known is not None
            and known_logits is not None
            and ctx.known_model is model
            and known.shape[0] == candidate.shape[0]
        ):
            reuse = known & (candidate == raw).flatten(1).all(1)
        if reuse is None or known_logits is None or not bool(reuse.any()):
            ctx.counters["forward"] += candidate.shape[0]
            with torch.no_grad():
                return model(candidate).float()
        logits = known_logits.clone()
        rest = (~reuse).nonzero().flatten()
        if rest.numel():
            ctx.counters["forward"] += rest.numel()
            with torch.no_grad():
                logits[rest] = model(candidate.index_select(0, rest)).float()
        return logits

    def check_candidate(
        self, candidate: Tensor, x: Tensor, eps: float, norm: str, bounds: tuple[float, float]
    ) -> None:
        """An attack's raw output must lie in the eps ball and the bounds (up to round-off): else a bug."""
        if candidate.shape != x.shape:
            raise AttackInvariantError(
                f"attack {self.name} returned shape {tuple(candidate.shape)} for inputs {tuple(x.shape)}"
            )
        if not bool(torch.isfinite(candidate).all()):
            raise AttackInvariantError(f"attack {self.name} returned non-finite values")
        excess = float((perturbation_norms(candidate - x, norm) - eps).max()) if x.shape[0] else 0.0
        if excess > BALL_TOLERANCE * max(1.0, eps):
            raise AttackInvariantError(
                f"attack {self.name} left the {norm} ball of radius {eps} by {excess:.2e}"
            )
        if (
            float(candidate.min()) < bounds[0] - BOUNDS_TOLERANCE
            or float(candidate.max()) > bounds[1] + BOUNDS_TOLERANCE
        ):
            raise AttackInvariantError(f"attack {self.name} left the input bounds {list(bounds)}")


def settled_projection(raw: Tensor, x: Tensor, norm: str, bounds: tuple[float, float]) -> Tensor:
    """``raw`` as the base's projection leaves it at any eps whose ball holds it, bit for bit.

    Why: a minimum-norm attack's example is measured once and then reported at every eps whose ball
    holds it; the base projects every candidate, and ``x + (raw - x)`` may differ from ``raw`` in
    the last bit. Projecting until nothing moves (float round-off settles after a step or two) gives
    the tensor that every later projection returns unchanged, so what was measured is what is reported.
    """
    current = project(raw, x, math.inf, norm, bounds)
    for _ in range(3):
        again = project(current, x, math.inf, norm, bounds)
        if torch.equal(again, current):
            break
        current = again
    return current


#: Result tensors whose first axis is the sample axis (the others are [E, N, ...]).
_SAMPLE_FIRST = {"clean_correct", "true_prob_clean", "min_norms"}


@dataclass
class _Slices:
    """The work ``in_batches`` does for one :meth:`Attack.run`: each slice of the images is one batch.

    A slice that runs out of memory is redone smaller (``in_batches``), so only a finished slice
    may count its passes or advance the batch index that seeds the noise.
    """

    attack: Attack
    model: nn.Module
    x: Tensor
    y: Tensor
    threat: ThreatModel
    bounds: tuple[float, float]
    device: torch.device
    bar: Any  # a tqdm bar or None (tqdm ships no type information)
    inspector: ExampleInspector | None = None
    counters: dict[str, int] = field(default_factory=lambda: {"forward": 0, "gradient": 0})
    batches_done: int = 0

    def __call__(self, begin: int, end: int) -> dict[str, Tensor]:
        raise_if_requested()
        slice_counters = {"forward": 0, "gradient": 0}
        batch = _Batch(
            self.attack,
            self.model,
            self.x[begin:end].to(self.device),
            self.y[begin:end].to(self.device),
            self.threat,
            self.bounds,
            self.batches_done,
            self.device,
            slice_counters,
            self.inspector,
        )
        part = batch.attack_every_eps(keep=max(0, min(self.attack.keep_examples, end) - begin))
        self.batches_done += 1
        for key, value in slice_counters.items():
            self.counters[key] += value
        if self.bar is not None:
            self.bar.update(end - begin)
        return part


class _Batch:
    """One batch attacked at every eps: what each sample reports, carried from eps to eps.

    Why carried: a sample fooled at a smaller eps keeps that adversarial example at every larger
    eps (it lies inside the larger ball), and with ``early_stop`` it is not attacked again; samples
    the model already gets wrong are not attacked at all. Each eps adds one row to every result.
    """

    def __init__(
        self,
        attack: Attack,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        bounds: tuple[float, float],
        batch_index: int,
        device: torch.device,
        counters: dict[str, int],
        inspector: ExampleInspector | None = None,
    ) -> None:
        self.attack, self.model, self.x, self.y, self.threat = attack, model, x, y, threat
        self.bounds, self.batch_index, self.device, self.counters = bounds, batch_index, device, counters
        self.inspector = inspector
        with torch.no_grad():
            clean_logits = model(x).float()
        counters["forward"] += x.shape[0]
        self.clean_prob = F.softmax(clean_logits, 1).gather(1, y[:, None]).squeeze(1)
        self.clean_correct = clean_logits.argmax(1) == y
        self.targets = self.choose_targets(clean_logits)
        # per sample: the reported example, whether the model still gets it right, its true-class
        # probability, and whether it reaches the goal (already on clean input: misclassified)
        self.best = x.clone()
        self.best_correct = self.clean_correct.clone()
        self.best_prob = self.clean_prob.clone()
        self.done = goal_reached(clean_logits, y, self.targets)
        self.history: dict[str, list[Tensor]] = {key: [] for key in _PER_EPS}
        self.clean_logits = clean_logits
        self.smallest: SmallestFound | None = None

    def attack_every_eps(self, *, keep: int) -> dict[str, Tensor]:
        """Attack at every eps, smallest first; ``keep``: how many of the first images to return."""
        if self.attack.minimum_norm:
            self.search_smallest()
        for e, eps in enumerate(self.threat.eps):
            if eps > 0:
                self.attack_at(e, float(eps))
            self.add_row(keep)
            if self.inspector is not None:
                self.inspector(self.x, self.best, float(eps))
        return self.part(keep)

    def choose_targets(self, clean_logits: Tensor) -> Tensor | None:
        """A targeted threat's target per sample, drawn from (attack seed, batch): reproducible."""
        if not self.threat.targeted:
            return None
        generator = torch.Generator().manual_seed(self.attack.seed * 7919 + self.batch_index)
        return self.threat.choose_targets(clean_logits, self.y, clean_logits.shape[1], generator)

    def context(self, eps_index: int, active: Tensor) -> PerturbContext:
        """What ``perturb`` (or a minimum-norm search) gets besides the tensors of the samples ``active``."""
        return PerturbContext(
            device=self.device,
            eps_index=eps_index,
            batch_index=self.batch_index,
            full_batch=self.x.shape[0],
            active=active,
            seed=self.attack.seed,
            bounds=self.bounds,
            amp=self.attack.amp,
            counters=self.counters,
            smallest=None if self.smallest is None else self.smallest.rows(active),
        )

    def search_smallest(self) -> None:
        """A minimum-norm attack's one search for the batch, verified by the base's own forward pass.

        Why verified here: the per-sample minimal norms speak for every eps, so they must not rest
        on the attack's bookkeeping. A row counts only if this forward pass finds that it reaches the
        goal; its norm is then the sample's minimal perturbation (0 where the model is wrong on clean
        input, inf where none was found).
        """
        examples, logits = self.x.clone(), self.clean_logits.clone()
        norms = torch.where(self.clean_correct, math.inf, 0.0)
        active = (self.clean_correct & ~self.done).nonzero().flatten()
        if active.numel():
            ctx = self.context(len(self.threat.eps), active)
            tx, ty = self.x.index_select(0, active), self.y.index_select(0, active)
            tt = optional_rows(self.targets, active)
            raw = self.attack.search_smallest(self.model, tx, ty, self.threat, tt, ctx).detach()
            self.attack.check_candidate(raw, tx, math.inf, self.threat.norm, self.bounds)
            candidate = settled_projection(raw, tx, self.threat.norm, self.bounds)
            measured = self.attack.measure(self.model, candidate, raw, ctx)
            hit = goal_reached(measured, ty, tt)
            rows = active[hit]
            examples[rows], logits[rows] = candidate[hit], measured[hit]
            norms[rows] = perturbation_norms(candidate[hit] - tx[hit], self.threat.norm)
        self.smallest = SmallestFound(examples, logits, norms)

    def attack_at(self, eps_index: int, eps: float) -> None:
        """Attack the samples that still need it at this eps and report what each candidate achieves."""
        # samples the model already gets wrong need no attack; with early_stop, neither do samples
        # fooled at a smaller eps (their example lies inside this larger ball)
        attack_now = self.clean_correct & ~self.done if self.attack.early_stop else self.clean_correct
        active = attack_now.nonzero().flatten()
        if not active.numel():
            return
        ctx = self.context(eps_index, active)
        tx, ty = self.x.index_select(0, active), self.y.index_select(0, active)
        tt = optional_rows(self.targets, active)
        raw = self.attack.perturb(self.model, tx, ty, eps, self.threat, tt, ctx).detach()
        self.attack.check_candidate(raw, tx, eps, self.threat.norm, self.bounds)
        candidate = project(raw, tx, eps, self.threat.norm, self.bounds)
        logits = self.attack.measure(self.model, candidate, raw, ctx)
        self.report(active, candidate, logits, ty, tt)

    def report(
        self, active: Tensor, candidate: Tensor, logits: Tensor, ty: Tensor, tt: Tensor | None
    ) -> None:
        """The samples ``active`` report their candidates, except those fooled at a smaller eps.

        Those keep that (smaller) example, so the plain computation (early_stop off) reports
        exactly what the shortcut does.
        """
        hit = goal_reached(logits, ty, tt)
        replace = ~self.done.index_select(0, active)
        newly = hit & replace
        idx = active[replace]
        self.best[idx] = candidate[replace]
        self.best_correct[idx] = (logits.argmax(1) == ty)[replace]
        self.best_prob[idx] = F.softmax(logits, 1).gather(1, ty[:, None]).squeeze(1)[replace]
        self.done[active[newly]] = True

    def add_row(self, keep: int) -> None:
        """Record what every sample reports at the eps just attacked."""
        self.history["success"].append(self.done.clone())
        self.history["correct"].append(self.best_correct.clone())
        self.history["norms"].append(perturbation_norms(self.best - self.x, self.threat.norm))
        self.history["true_prob_adv"].append(self.best_prob.clone())
        if keep:  # (.cpu() is no copy on the CPU, hence the clone)
            self.history["adv_examples"].append(self.best[:keep].detach().cpu().clone())

    def part(self, keep: int) -> dict[str, Tensor]:
        """The batch's part of the result, on the CPU; ``keep``: how many adversarial examples."""
        out = {
            "clean_correct": self.clean_correct.cpu(),
            "true_prob_clean": self.clean_prob.cpu(),
            **{
                key: torch.stack(self.history[key]).cpu()
                for key in ("success", "correct", "norms", "true_prob_adv")
            },
        }
        if keep:
            out["adv_examples"] = torch.stack(self.history["adv_examples"])
        if self.smallest is not None:
            out["min_norms"] = self.smallest.norms.cpu()
        return out


#: What a batch records at every eps (one row each).
_PER_EPS = ("success", "correct", "norms", "true_prob_adv", "adv_examples")
