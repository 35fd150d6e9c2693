"""The per-eps probe: the reference attack run on its own at every eps, the monotonicity check's evidence.

Why a probe of its own: the attack base carries a sample's first success to every larger eps (and
stops attacking it there), so every reported curve of an untargeted threat is monotone by
construction, and an attack that is weaker at a larger eps (Carlini et al.'s sign of a broken
attack) cannot show in them. The same attack run independently at each eps, on a subset and with
few steps, can. Its cost is ``samples x len(eps) x steps`` gradient passes at most (100 x 8 x 10
on mnist_linf's eight radii with the defaults), and its results count in the worst case where it ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from robustcnn.attacks import APGD, PGD, AttackResult
from robustcnn.attacks.contract import ExampleInspector
from robustcnn.threat import ThreatModel

#: The suffix the probe reports under: ``<reference attack>_per_eps``.
SUFFIX = "_per_eps"


def per_eps_probe(
    reference: PGD | APGD,
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    samples: int,
    steps: int,
    inspector_for: Callable[[str], ExampleInspector],
) -> AttackResult:
    """``reference`` (capped at ``steps``, one restart) on the first ``samples`` images, one run per eps.

    Each run sees a single eps, so no sample's success at a smaller eps is carried into it; the
    seed is the reference's, so every eps starts from the same random directions.
    """
    n = min(int(x.shape[0]), samples)
    probe = reference.with_(steps=min(reference.steps, steps), restarts=1, name=f"{name}{SUFFIX}")
    inspector = inspector_for(probe.name)
    parts = [
        probe.run(model, x[:n], y[:n], replace(threat, eps=(value,), reference_eps=None), inspector=inspector)
        for value in threat.eps
    ]
    return stack_eps(parts, threat)


def stack_eps(parts: Sequence[AttackResult], threat: ThreatModel) -> AttackResult:
    """One result over ``threat``'s eps from single-eps runs of one attack on the same images (in order)."""
    first = parts[0]
    kept = [p.adv_examples for p in parts]
    return AttackResult(
        name=first.name,
        threat=threat,
        params=first.params,
        clean_correct=first.clean_correct,
        success=torch.cat([p.success for p in parts]),
        correct=torch.cat([p.correct for p in parts]),
        norms=torch.cat([p.norms for p in parts]),
        true_prob_clean=first.true_prob_clean,
        true_prob_adv=torch.cat([p.true_prob_adv for p in parts]),
        clean_examples=first.clean_examples,
        adv_examples=torch.cat(kept) if all(k.numel() for k in kept) else torch.empty(0),
        seconds=sum(p.seconds for p in parts),
        forward_passes=sum(p.forward_passes for p in parts),
        gradient_passes=sum(p.gradient_passes for p in parts),
    )
