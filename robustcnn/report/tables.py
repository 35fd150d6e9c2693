"""The dashboard's tables as plain data: rows of cells with display text and a sort key.

Cells carry *unescaped* text: escaping happens in exactly one place, when page.py writes HTML, so
no builder here can forget it. The numbers (area under the curve, the Pareto front) are computed
here because they are what a reader compares runs by, and they are unit-tested on hand-made runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from robustcnn.report.records import RunRecord

#: Verdict of a run whose sanity checks failed (see robustcnn.evaluation.checks).
UNRELIABLE = "unreliable"
#: Verdict of a run whose sanity checks were turned off (checks.enabled=false): no verdict at all.
UNCHECKED = "unchecked"

#: How a check's status shows in the sanity-check table: (text, CSS class).
CHECK_CELLS = {
    "passed": ("pass", "pass"),
    "failed": ("FAIL", "fail"),
    "skipped": ("skipped", "skip"),
    "enforced": ("enforced", "skip"),
}


@dataclass(frozen=True)
class Cell:
    """One table cell: display text, an optional numeric sort key, tooltip and CSS class."""

    text: str
    sort: float | None = None
    title: str | None = None
    css: str | None = None


@dataclass
class Row:
    cells: list[Cell]
    run_id: str = ""
    flagged: bool = False  # visibly marked (an unreliable result, a failed check)


@dataclass
class Table:
    columns: list[str]
    rows: list[Row] = field(default_factory=list)


def eps_key(value: float) -> float:
    """eps values from different runs compare equal despite float noise (0.1 vs 0.1000000001)."""
    return round(float(value), 6)


def fmt_num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return str(value)


def num_cell(value: Any, digits: int = 3, css: str | None = None) -> Cell:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return Cell(fmt_num(value, digits), float(value) if numeric else None, css=css)


def fmt_eps(value: float) -> str:
    return f"{value:.4g}"


def curve_auc(eps: Sequence[float], accuracy: Sequence[float]) -> float | None:
    """Area under a robustness curve (trapezoid), divided by the eps range: a mean accuracy in [0, 1].

    Normalising by the range makes runs with different eps grids comparable; a single eps gives
    that point's accuracy. None when there is no curve.
    """
    points = sorted((float(e), float(a)) for e, a in zip(eps, accuracy, strict=False) if a is not None)
    if not points:
        return None
    if len(points) == 1 or points[-1][0] == points[0][0]:
        return sum(a for _, a in points) / len(points)
    area = sum((e1 - e0) * (a0 + a1) / 2 for (e0, a0), (e1, a1) in zip(points, points[1:], strict=False))
    return area / (points[-1][0] - points[0][0])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both maximised), by the first axis.

    A point is dominated when another is at least as good on both axes and better on one; equal
    points are all on the front.
    """
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox >= x and oy >= y) and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def worst_case(run: RunRecord) -> dict[float, float]:
    """``{eps: worst-case robust accuracy}`` of a run (empty when it ran no attack)."""
    eps = run.result("eps") or []
    acc = run.result("worst_case_robust_accuracy") or []
    return {eps_key(e): float(a) for e, a in zip(eps, acc, strict=False) if a is not None}


def run_auc(run: RunRecord) -> float | None:
    curve = worst_case(run)
    return curve_auc(list(curve), list(curve.values()))


def reference_point(run: RunRecord) -> tuple[float, float] | None:
    """(clean accuracy, worst-case robust accuracy at the reference eps): the trade-off plot's point."""
    clean, robust = run.result("clean_accuracy"), run.result("reference_robust_accuracy")
    if clean is None or robust is None:
        return None
    return float(clean), float(robust)


def failed_checks(run: RunRecord) -> list[str]:
    return [str(c.get("name")) for c in run.result("checks") or [] if c.get("passed") is False]


def is_flagged(run: RunRecord) -> bool:
    """Unreliable or unchecked verdict, or any failed sanity check: marked wherever the run appears."""
    return run.result("verdict") in (UNRELIABLE, UNCHECKED) or bool(failed_checks(run))


def check_status(check: dict[str, Any]) -> str:
    """passed / failed / skipped / enforced (results.json's ``status``; old results: ``passed`` only)."""
    status = check.get("status")
    if status in CHECK_CELLS:
        return str(status)
    passed = check.get("passed")
    return "passed" if passed is True else "failed" if passed is False else "skipped"


def verdict_text(run: RunRecord) -> str:
    """The verdict, marked when flagged, and saying so when it rests on black-box attacks only."""
    text = ("⚠ " if is_flagged(run) else "") + str(run.result("verdict") or "–")
    return text + (" (black-box only)" if run.result("evidence") == "black_box" else "")


def _eps_columns(runs: Iterable[RunRecord]) -> list[float]:
    return sorted({e for run in runs for e in worst_case(run)})


def _leaderboard_order(run: RunRecord) -> tuple[float, float, float]:
    """Best first: robust accuracy at the reference eps, then the curve's area, then clean accuracy."""
    def neg(value: Any) -> float:
        return -float(value) if value is not None else math.inf

    return neg(run.result("reference_robust_accuracy")), neg(run_auc(run)), neg(run.result("clean_accuracy"))


def leaderboard(runs: Sequence[RunRecord]) -> Table:
    """One row per finished run, sorted by worst-case robust accuracy at the reference eps."""
    eps_cols = _eps_columns(runs)
    table = Table(
        ["run", "verdict", "model", "defense", "data", "norm", "clean acc.",
         *[f"robust @ ε={fmt_eps(e)}" for e in eps_cols],
         "robust @ ref. ε", "AUC (robust vs ε)", "attacks", "train s", "epoch cost"]
    )
    for run in sorted(runs, key=_leaderboard_order):
        curve = worst_case(run)
        flagged = is_flagged(run)
        ref_eps = run.result("reference_eps")
        ref_cell = num_cell(run.result("reference_robust_accuracy"))
        if ref_eps is not None:
            ref_cell = Cell(ref_cell.text, ref_cell.sort, title=f"reference ε = {fmt_eps(ref_eps)}")
        seconds = run.result("train_seconds")
        train = num_cell(seconds, 1)
        if run.result("cache_hit"):
            train = Cell(f"{train.text} (cached)", train.sort, title="weights taken from the cache")
        table.rows.append(
            Row(
                [
                    Cell(run.label, title=run.run_id),
                    Cell(verdict_text(run), css="fail" if flagged else None,
                         title=", ".join(failed_checks(run)) or None),
                    Cell(run.model or "–"),
                    Cell(str(run.defense or "–")),
                    Cell(str(run.result("data") or "–")),
                    Cell(str((run.result("threat") or {}).get("norm", "–"))),
                    num_cell(run.result("clean_accuracy")),
                    *[num_cell(curve.get(e)) for e in eps_cols],
                    ref_cell,
                    num_cell(run_auc(run)),
                    Cell(", ".join(attacks_used(run)) or "–"),
                    train,
                    _epoch_cost_cell(run),
                ],
                run_id=run.run_id,
                flagged=flagged,
            )
        )
    return table


def attacks_used(run: RunRecord) -> list[str]:
    """The attacks a run's battery ran (its per-attack curves), in results.json's order."""
    return [str(name) for name in run.result("robust_accuracy") or {}]


def attribution_stability(runs: Sequence[RunRecord]) -> Table:
    """Per run that logged attribution maps: how much each map moved under attack (rank correlation).

    results.json ``attributions``: Spearman's rho between the clean and the adversarial map of the
    true class, averaged over the kept examples (1: unmoved, 0: unrelated).
    """
    methods: list[str] = []
    for run in runs:
        for method in (run.result("attributions") or {}).get("stability") or {}:
            if method not in methods:
                methods.append(str(method))
    table = Table(["run", "defense", "attack", "ε", *methods, "examples", "seconds"])
    for run in sorted(runs, key=_leaderboard_order):
        found = run.result("attributions")
        if not isinstance(found, dict):
            continue
        stability = found.get("stability") or {}
        table.rows.append(
            Row(
                [Cell(run.label, title=run.run_id), Cell(str(run.defense or "–")),
                 Cell(str(found.get("attack") or "–")), num_cell(found.get("eps"), 4),
                 *[num_cell(stability.get(m)) for m in methods], num_cell(found.get("examples")),
                 num_cell(found.get("seconds"), 2)],
                run_id=run.run_id,
            )
        )
    return table


def _epoch_cost_cell(run: RunRecord) -> Cell:
    """A defense's training epoch over a standard one (an AT method's price), e.g. "11.4×"."""
    report = run.result("defense_report") or {}
    ratio = report.get("epoch_cost_ratio")
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        return Cell("–")
    seconds = report.get("epoch_seconds")
    title = f"{seconds:.1f} s per epoch" if isinstance(seconds, (int, float)) else None
    return Cell(f"{ratio:.1f}×", float(ratio), title=title)


def attack_breakdown(runs: Sequence[RunRecord]) -> Table:
    """Robust accuracy of every attack of every run at every eps (the worst case is their minimum)."""
    eps_cols = _eps_columns(runs)
    table = Table(["run", "attack", *[f"ε={fmt_eps(e)}" for e in eps_cols], "images/s"])
    for run in sorted(runs, key=_leaderboard_order):
        eps = [eps_key(e) for e in run.result("eps") or []]
        timing = run.result("timing") or {}
        for attack, accuracy in sorted((run.result("robust_accuracy") or {}).items()):
            by_eps = dict(zip(eps, accuracy, strict=False))
            table.rows.append(
                Row(
                    [
                        Cell(run.label, title=run.run_id),
                        Cell(attack),
                        *[num_cell(by_eps.get(e)) for e in eps_cols],
                        num_cell((timing.get(attack) or {}).get("images_per_s"), 0),
                    ],
                    run_id=run.run_id,
                )
            )
    return table


def minimal_perturbations(runs: Sequence[RunRecord]) -> Table:
    """Per run with a minimum-norm attack: the per-sample minimal perturbation's quartiles.

    A robustness figure that needs no eps choice (results.json ``minimal_perturbation``); a
    quantile shown as "unbroken" falls on a sample that no attack broke.
    """
    table = Table(["run", "defense", "norm", "q1", "median", "q3", "unbroken", "from"])
    for run in sorted(runs, key=_leaderboard_order):
        found = run.result("minimal_perturbation")
        if not isinstance(found, dict):
            continue
        quartiles = [
            num_cell(found.get(key), 4) if found.get(key) is not None else Cell("unbroken")
            for key in ("q1", "median", "q3")
        ]
        table.rows.append(
            Row(
                [Cell(run.label, title=run.run_id), Cell(str(run.defense or "–")),
                 Cell(str(found.get("norm", "–"))), *quartiles, num_cell(found.get("unbroken_fraction")),
                 Cell(", ".join(str(a) for a in found.get("attacks") or []) or "–")],
                run_id=run.run_id,
            )
        )
    return table


def sanity_checks(runs: Sequence[RunRecord]) -> Table:
    """Each run's checks (pass / FAIL / skipped) and verdict; failing rows are flagged."""
    names: list[str] = []
    for run in runs:
        for check in run.result("checks") or []:
            if check.get("name") not in names:
                names.append(str(check.get("name")))
    table = Table(["run", "verdict", *names])
    for run in sorted(runs, key=_leaderboard_order):
        by_name = {str(c.get("name")): c for c in run.result("checks") or []}
        cells = []
        for name in names:
            check = by_name.get(name)
            if check is None:
                cells.append(Cell("–"))
                continue
            text, css = CHECK_CELLS[check_status(check)]
            cells.append(Cell(text, title=str(check.get("detail") or "") or None, css=css))
        flagged = is_flagged(run)
        table.rows.append(
            Row(
                [Cell(run.label, title=run.run_id),
                 Cell(verdict_text(run), css="fail" if flagged else None), *cells],
                run_id=run.run_id,
                flagged=flagged,
            )
        )
    return table


def incomplete_runs(runs: Sequence[RunRecord]) -> Table:
    """Runs that did not finish (failed, killed, still running): listed, never ranked."""
    table = Table(["run", "status", "started (UTC)", "model", "defense", "data", "run id"])
    for run in sorted(runs, key=lambda r: r.start_time or 0):
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(run.start_time / 1000)) if run.start_time else "–"
        )
        table.rows.append(
            Row(
                [Cell(run.label), Cell(run.status, css="fail"), Cell(started),
                 Cell(run.model or "–"), Cell(run.defense or "–"), Cell(run.tags.get("data", "–")),
                 Cell(run.run_id)],
                run_id=run.run_id,
            )
        )
    return table


def environments(runs: Sequence[RunRecord]) -> Table:
    """Library versions and device of every run (results.json ``environment``) and the code version."""
    keys: list[str] = []
    for run in runs:
        for key in run.result("environment") or {}:
            if key not in keys:
                keys.append(key)
    table = Table(["run", *keys, "code version", "run id"])
    for run in runs:
        env = run.result("environment") or {}
        table.rows.append(
            Row(
                [Cell(run.label), *[Cell(str(env.get(k, "–"))) for k in keys],
                 Cell(run.tags.get("robustcnn.code_version", "–")), Cell(run.run_id)],
                run_id=run.run_id,
            )
        )
    return table
