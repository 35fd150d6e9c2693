"""One :meth:`Attack.run <robustcnn.attacks.base.Attack.run>` as batches: each slice of the images is
attacked at every eps, smallest first, and reports what each sample's candidate achieved.

Why apart from the base class: this is the machinery (carrying examples from eps to eps, the
minimum-norm search's verification, the per-eps rows), not the contract a subclass writes against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustcnn.attacks.context import PerturbContext, goal_reached
from robustcnn.attacks.contract import ExampleInspector, settled_projection
from robustcnn.attacks.restarts import optional_rows
from robustcnn.attacks.result import SmallestFound
from robustcnn.interrupts import raise_if_requested
from robustcnn.threat import ThreatModel, perturbation_norms, project

if TYPE_CHECKING:  # the base imports this module to run an attack; the class is only a type here
    from robustcnn.attacks.base import Attack


#: Result tensors whose first axis is the sample axis (the others are [E, N, ...]).
SAMPLE_FIRST = {"clean_correct", "true_prob_clean", "min_norms"}


@dataclass
class Slices:
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
