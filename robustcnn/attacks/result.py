"""What an attack reports: per eps and per sample, the outcome of one attack on a batch of images.

Why its own module: the battery, the checks, the report and the tests read results without
running an attack; the base (:mod:`robustcnn.attacks.base`) builds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from robustcnn.threat import ThreatModel

#: A setting's value: what ``params()`` reports and what ``with_`` changes (numbers, flags, names).
SettingValue = bool | int | float | str | None


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
