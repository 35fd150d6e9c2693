"""The statistics a face study's claims rest on: does a patch beat its random baseline, and how sure is a
measured false-accept rate.

Why exact tests: a study has few photos and a few dozen draws per patch, where normal approximations
mislead. A patch and its random baseline are judged on the same held-out draws, so the comparison is
paired: only the draws where exactly one of them succeeds carry evidence (exact McNemar test, a
one-sided binomial test on those discordant draws). A false-accept rate measured on n impostor pairs is
a binomial proportion; its Clopper-Pearson interval never under-covers.
"""

from __future__ import annotations

from typing import Any  # Any: the JSON-able check

#: A patch beats its baseline when the one-sided p-value is below this.
ALPHA = 0.05
#: Name of the study check that every patch beats its random baseline.
BASELINE_CHECK = "patches_beat_random_baseline"


def paired_p_value(patch_only: int, baseline_only: int) -> float:
    """One-sided exact McNemar p-value that the patch succeeds more often than the baseline.

    ``patch_only``: draws where the patch succeeds and the baseline does not; ``baseline_only``: the
    reverse. Without a discordant draw there is no evidence either way (p = 1).
    """
    from scipy.stats import binomtest

    if patch_only < 0 or baseline_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {patch_only} and {baseline_only}")
    trials = patch_only + baseline_only
    if trials == 0:
        return 1.0
    return float(binomtest(patch_only, trials, 0.5, alternative="greater").pvalue)


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval of a binomial proportion ``successes / trials``."""
    from scipy.stats import binomtest

    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    interval = binomtest(successes, trials).proportion_ci(confidence, method="exact")
    return float(interval.low), float(interval.high)


def baseline_check(patches: list[dict[str, Any]]) -> dict[str, Any]:
    """The study check: every patch beats its own random baseline on its held-out draws.

    Fails (``passed: false``) naming each patch that does not; a study with no patch is skipped.
    A patch that does not beat noise of the same shape is no evidence of an attack.
    """
    if not patches:
        return {"name": BASELINE_CHECK, "passed": None, "status": "skipped", "detail": "no patch"}
    losers = [p for p in patches if not p["beats_baseline"]]
    names = ", ".join(
        f"{p['goal']} {p['attacker']}"
        + (f" as {p['target']}" if p.get("target") else "")
        + f" (p={p['p_value']:.3g})"
        for p in losers
    )
    detail = (
        f"all {len(patches)} patch(es) beat their random patch (one-sided exact McNemar, p < {ALPHA})"
        if not losers
        else f"{len(losers)} of {len(patches)} patch(es) do not beat their random patch: {names}"
    )
    return {
        "name": BASELINE_CHECK,
        "passed": not losers,
        "status": "failed" if losers else "passed",
        "detail": detail,
    }
