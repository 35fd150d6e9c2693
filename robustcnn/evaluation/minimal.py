"""The distribution of the per-sample minimal perturbation: a robustness figure without an eps choice.

Why: a robust accuracy depends on the eps grid someone picked; the smallest perturbation that
breaks each sample does not. When a minimum-norm attack (FMN) ran, every sample has such a figure:
the smallest norm shown to make the model wrong, over the attack's verified search and every
example any attack of the battery reported wrong at any eps (an upper bound on the true minimum,
0 where the model is wrong on clean input, inf where nothing broke it). The worst-case robust
accuracy at eps is (up to the probes) the fraction of samples whose figure exceeds eps, so the
median is the eps at which half the samples are broken.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from robustcnn.attacks import AttackResult

#: The quantiles reported (quartiles and median).
QUANTILES = {"q1": 0.25, "median": 0.5, "q3": 0.75}


def per_sample_minimum(results: Mapping[str, AttackResult]) -> Tensor | None:
    """Per sample, the smallest norm any attack showed to break it (float [N]); None without FMN."""
    if not any(r.min_norms is not None for r in results.values()):
        return None
    n = max(r.n for r in results.values())
    shown = [r.minimal_norms() for r in results.values() if r.n == n]
    return torch.stack(shown).amin(0)


def summary(results: Mapping[str, AttackResult], norm: str) -> dict[str, Any] | None:
    """Quartiles, median and the unbroken fraction of :func:`per_sample_minimum`; None without FMN.

    The quantiles take the next sample above ("higher" interpolation), so a figure is a norm some
    sample really needed; one that falls on an unbroken sample is None (JSON has no infinity).
    (Any: a JSON section of mixed values.)
    """
    values = per_sample_minimum(results)
    if values is None:
        return None
    levels = torch.tensor(list(QUANTILES.values()), dtype=values.dtype)
    found = torch.quantile(values, levels, interpolation="higher") if values.numel() else None
    figures = {
        name: None if found is None or not math.isfinite(float(found[i])) else float(found[i])
        for i, name in enumerate(QUANTILES)
    }
    return {
        "norm": norm,
        "n": int(values.numel()),
        **figures,
        "unbroken_fraction": float(torch.isinf(values).float().mean()) if values.numel() else None,
        "attacks": sorted(k for k, r in results.items() if r.min_norms is not None),
    }
