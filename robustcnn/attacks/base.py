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

Where the pieces live: this module holds the class a subclass extends; ``contract`` the invariants
(input validation, ``attack_mode``, tolerances), ``context`` what ``perturb`` gets, ``result`` what
a run reports, and ``batches`` the machinery that runs one call batch by batch and eps by eps.
"""

from __future__ import annotations

import copy
import inspect
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypedDict, TypeVar

import torch
from torch import Tensor, nn

from robustcnn.attacks.batches import SAMPLE_FIRST, Slices
from robustcnn.attacks.context import PerturbContext
from robustcnn.attacks.contract import (
    BALL_TOLERANCE,
    BOUNDS_TOLERANCE,
    AttackInvariantError,
    ExampleInspector,
    attack_mode,
    input_bounds,
    validate_inputs,
)
from robustcnn.attacks.result import AttackResult, SettingValue
from robustcnn.batching import in_batches, is_out_of_memory, out_of_memory_error
from robustcnn.errors import ConfigError
from robustcnn.progress import progress_bar
from robustcnn.threat import ThreatModel, perturbation_norms


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
        slices = Slices(
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
            key: torch.cat([p[key] for p in parts], dim=0 if key in SAMPLE_FIRST else 1)
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
