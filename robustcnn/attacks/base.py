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
  again; samples the model already gets wrong are not attacked at all.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.batching import autocast_for, in_batches, is_out_of_memory, out_of_memory_error
from robustcnn.errors import ConfigError, RobustCNNError
from robustcnn.interrupts import raise_if_requested
from robustcnn.progress import progress_bar
from robustcnn.threat import ThreatModel, perturbation_norms, project

#: Slack allowed between an attack's raw output and the eps ball / bounds before projection.
BALL_TOLERANCE = 1e-4
BOUNDS_TOLERANCE = 1e-5


#: A setting's value, as ``params()`` reports it (numbers, flags, names).
SettingValue = bool | int | float | str | None


class AttackInvariantError(RobustCNNError):
    """An attack broke its contract (left the eps ball or bounds, touched parameters): a bug."""

    exit_code = 3


@dataclass
class AttackResult:
    """Per-eps, per-sample outcome of one attack on one batch of samples (tensors on the CPU)."""

    name: str
    threat: ThreatModel
    params: dict[str, Any]
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

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
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
    for p, before in zip(params, grads_before, strict=True):
        if (before is None) != (p.grad is None) or (before is not None and not torch.equal(before, p.grad)):
            raise AttackInvariantError("an attack accumulated gradients into the model's parameters")


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


class AttackOptions(TypedDict, total=False):
    """The settings every attack takes (:class:`Attack`'s keywords), passed on by a subclass."""

    batch_size: int
    seed: int
    early_stop: bool
    keep_examples: int
    amp: bool


class Attack(ABC):
    """Base of every attack. Subclasses set ``name`` and implement :meth:`perturb`."""

    name: ClassVar[str] = "attack"
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

    def params(self) -> dict[str, Any]:
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

    # -- the contract ---------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> AttackResult:
        return self.run(model, x, y, threat)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> AttackResult:
        if threat.norm not in self.norms:
            raise ConfigError(f"attack {self.name} supports the norms {self.norms}, not {threat.norm!r}")
        if x.shape[0] == 0:
            raise ConfigError("no images to attack; check data.max_test / eval.max_samples")
        bounds = tuple(getattr(model, "bounds", (0.0, 1.0)))
        with attack_mode(model):  # eval mode: validation must not touch BatchNorm statistics
            try:
                validate_inputs(model, x, y, bounds)  # type: ignore[arg-type]
            except RuntimeError as exc:
                if is_out_of_memory(exc):  # two images (the shape probe) already do not fit
                    raise out_of_memory_error(f"attack {self.name}", 2) from exc
                raise
        threat.check_input_size(tuple(x.shape[1:]))
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        y = y.long()
        counters = {"forward": 0, "gradient": 0}
        batches_done = 0
        bar = progress_bar(
            x.shape[0], f"attack {self.name}", self.progress and x.shape[0] > self.batch_size, unit="img"
        )

        def attack_slice(begin: int, end: int) -> dict[str, Tensor]:
            # a slice that runs out of memory is redone smaller (in_batches): only finished
            # slices may count passes or advance the batch index that seeds the noise
            nonlocal batches_done
            raise_if_requested()
            slice_counters = {"forward": 0, "gradient": 0}
            part = self._run_batch(
                model,
                x[begin:end].to(device),
                y[begin:end].to(device),
                threat,
                bounds,
                batches_done,
                device,
                slice_counters,
                keep=max(0, min(self.keep_examples, end) - begin),
            )
            batches_done += 1
            for key, value in slice_counters.items():
                counters[key] += value
            if bar is not None:
                bar.update(end - begin)
            return part

        start = time.perf_counter()
        with attack_mode(model):
            # the batch size is halved for this call only: a later call (another model) may fit
            parts = in_batches(
                attack_slice,
                x.shape[0],
                self.batch_size,
                what=f"attack {self.name}",
                setting=f"attack.{type(self).name}.batch_size (or eval.attack_batch_size)",
            )
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
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
        )

    def _run_batch(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        bounds: tuple[float, float],
        batch_index: int,
        device: torch.device,
        counters: dict[str, int],
        *,
        keep: int,
    ) -> dict[str, Tensor]:
        """Attack one batch at every eps; ``keep``: how many of its first images to return."""
        n = x.shape[0]
        with torch.no_grad():
            clean_logits = model(x).float()
        counters["forward"] += n
        clean_prob = F.softmax(clean_logits, 1).gather(1, y[:, None]).squeeze(1)
        clean_correct = clean_logits.argmax(1) == y
        targets = None
        if threat.targeted:
            generator = torch.Generator().manual_seed(self.seed * 7919 + batch_index)
            targets = threat.choose_targets(clean_logits, y, clean_logits.shape[1], generator)
        reached = goal_reached(clean_logits, y, targets)
        # state carried across eps: the reported example per sample and what it achieves
        best = x.clone()
        best_correct = clean_correct.clone()
        best_prob = clean_prob.clone()
        done = reached.clone()
        success_rows, correct_rows, norm_rows, prob_rows, adv_rows = [], [], [], [], []
        for e, eps in enumerate(threat.eps):
            if eps > 0:
                # samples the model already gets wrong need no attack; with early_stop, neither do
                # samples fooled at a smaller eps (their example lies inside this larger ball)
                attack_now = clean_correct & ~done if self.early_stop else clean_correct
                active = attack_now.nonzero().flatten()
                if active.numel():
                    ctx = PerturbContext(
                        device=device,
                        eps_index=e,
                        batch_index=batch_index,
                        full_batch=n,
                        active=active,
                        seed=self.seed,
                        bounds=bounds,
                        amp=self.amp,
                        counters=counters,
                    )
                    tx, ty = x.index_select(0, active), y.index_select(0, active)
                    tt = targets.index_select(0, active) if targets is not None else None
                    raw = self.perturb(model, tx, ty, float(eps), threat, tt, ctx).detach()
                    self._check_candidate(raw, tx, float(eps), threat.norm, bounds)
                    candidate = project(raw, tx, float(eps), threat.norm, bounds)
                    logits = self._measure(model, candidate, raw, ctx, counters)
                    hit = goal_reached(logits, ty, tt)
                    # a sample already fooled at a smaller eps keeps that (smaller) example, so the
                    # plain computation (early_stop off) reports exactly what the shortcut does
                    replace = ~done.index_select(0, active)
                    newly = hit & replace
                    idx = active[replace]
                    best[idx] = candidate[replace]
                    best_correct[idx] = (logits.argmax(1) == ty)[replace]
                    best_prob[idx] = F.softmax(logits, 1).gather(1, ty[:, None]).squeeze(1)[replace]
                    done[active[newly]] = True
            success_rows.append(done.clone())
            correct_rows.append(best_correct.clone())
            norm_rows.append(perturbation_norms(best - x, threat.norm))
            prob_rows.append(best_prob.clone())
            if keep:
                adv_rows.append(best[:keep].detach().cpu().clone())  # .cpu() is no copy on CPU
        out = {
            "clean_correct": clean_correct.cpu(),
            "success": torch.stack(success_rows).cpu(),
            "correct": torch.stack(correct_rows).cpu(),
            "norms": torch.stack(norm_rows).cpu(),
            "true_prob_clean": clean_prob.cpu(),
            "true_prob_adv": torch.stack(prob_rows).cpu(),
        }
        if keep:
            out["adv_examples"] = torch.stack(adv_rows)
        return out

    def _measure(
        self, model: nn.Module, candidate: Tensor, raw: Tensor, ctx: PerturbContext, counters: dict[str, int]
    ) -> Tensor:
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
            counters["forward"] += candidate.shape[0]
            with torch.no_grad():
                return model(candidate).float()
        logits = known_logits.clone()
        rest = (~reuse).nonzero().flatten()
        if rest.numel():
            counters["forward"] += rest.numel()
            with torch.no_grad():
                logits[rest] = model(candidate.index_select(0, rest)).float()
        return logits

    def _check_candidate(
        self, candidate: Tensor, x: Tensor, eps: float, norm: str, bounds: tuple[float, float]
    ) -> None:
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


#: Result tensors whose first axis is the sample axis (the others are [E, N, ...]).
_SAMPLE_FIRST = {"clean_correct", "true_prob_clean"}
