"""The face study's part of the dashboard: one section per face run, in the study's own terms.

Why apart from the classifier tables: a face run has no accuracy, eps curve or defense; its claims
are success rates of patches, each with what the optimisation never saw (``held_out``), its random
and no-patch baselines at the calibrated threshold, whether it beats its baseline, and the threshold's
false-accept rate measured on impostor pairs the fit never saw. Older face runs (before those keys)
still get a section, with "–" where a key is missing.
"""

from __future__ import annotations

import base64
from typing import Any

from robustcnn.report.records import FACE_IMAGE_PREFIX, RunRecord
from robustcnn.report.tables import Cell, Row, Table, fmt_num, num_cell


def _pct(value: Any) -> Cell:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return Cell("–")
    return Cell(f"{100 * value:.1f}%", float(value))


def _beats(value: Any) -> Cell:
    if value is None:
        return Cell("–")
    return Cell("yes", css="pass") if value else Cell("NO", css="fail")


def _figure_row(figure: dict[str, Any], run_id: str, lead: list[Cell], photos: bool) -> Row:
    """One figure: ``lead`` cells, goal, what was held out (and which photos), patches, success next to
    both baselines, how many patches beat theirs (the row flagged unless all do)."""
    beat = f"{figure.get('beat_baseline', '–')}/{figure.get('patches', '–')}"
    all_beat = figure.get("beat_baseline") == figure.get("patches")
    cells = [
        *lead,
        Cell(str(figure.get("goal"))),
        Cell(str(figure.get("held_out"))),
        *([Cell(str(figure.get("photos")))] if photos else []),
        num_cell(figure.get("patches")),
        _pct(figure.get("success_rate")),
        _pct(figure.get("random_patch_success_rate")),
        _pct(figure.get("clean_success_rate")),
        Cell(beat, css="pass" if all_beat else "fail"),
    ]
    return Row(cells, run_id, not all_beat)


def figures_table(run: RunRecord) -> Table:
    """Each goal's mean success in sample and on held-out photos, next to both baselines."""
    table = Table(["goal", "held out", "photos judged", "patches", "success", "random patch", "no patch",
                   "beat baseline"])  # fmt: skip
    for figure in run.result("figures") or []:
        table.rows.append(_figure_row(figure, run.run_id, [], photos=True))
    return table


def transfer_table(run: RunRecord) -> Table:
    """Each held-out recognizer (never optimised against): its threshold and held-out false-accept
    rate, and per goal the mean success next to the random patch and the bare face."""
    table = Table(["recognizer", "threshold", "false-accept rate", "goal", "held out", "patches", "success",
                   "random patch", "no patch", "beat baseline"])  # fmt: skip
    for name, entry in (run.result("transfer") or {}).items():
        lead = [Cell(str(name)), num_cell(entry.get("threshold"), 3), _pct(entry.get("false_accept_rate"))]
        for figure in entry.get("figures") or []:
            table.rows.append(_figure_row(figure, run.run_id, lead, photos=False))
    return table


def _evaluation(record: dict[str, Any], key: str, field: str) -> Any:
    evaluation = record.get(key) or {}
    if field == "random":
        return (evaluation.get("random_patch") or {}).get("success_rate")
    return evaluation.get(field)


def patches_table(run: RunRecord) -> Table:
    """One row per patch: who, what for, success in sample and on held-out photos, each baseline, and the
    share of the recognizer's saliency inside the patch on the clean and the patched face (next to the
    patch's share of the image: what attention spread evenly would give)."""
    table = Table(["goal", "attacker", "target", "held out", "success (in sample)", "random (in sample)",
                   "success (held-out photos)", "random (held-out photos)", "no patch", "beats baseline",
                   "p-value", "saliency in patch (clean)", "saliency in patch (patched)",
                   "patch area"])  # fmt: skip
    for record in run.result("patches") or []:
        flagged = record.get("beats_baseline") is False
        saliency = record.get("saliency") or {}
        cells = [
            Cell(str(record.get("goal"))),
            Cell(str(record.get("attacker"))),
            Cell(str(record.get("target") or "–")),
            Cell(str(record.get("held_out"))),
            _pct(_evaluation(record, "in_sample", "success_rate")),
            _pct(_evaluation(record, "in_sample", "random")),
            _pct(_evaluation(record, "held_out_photos", "success_rate")),
            _pct(_evaluation(record, "held_out_photos", "random")),
            _pct(record.get("clean_success_rate")),
            _beats(record.get("beats_baseline")),
            num_cell(record.get("p_value"), 4),
            *(_pct(saliency.get(key)) for key in ("clean_mass_in_patch", "patched_mass_in_patch",
                                                   "patch_area_fraction")),
        ]
        table.rows.append(Row(cells, run.run_id, flagged))
    return table


def threshold_note(run: RunRecord) -> str:
    """The threshold, and its false-accept rate on held-out impostor pairs with the exact interval."""
    verification = run.result("verification") or {}
    held = verification.get("held_out") or {}
    interval = verification.get("false_accept_interval")
    shown = "–" if not interval else f"[{100 * interval[0]:.1f}%, {100 * interval[1]:.1f}%]"
    far = verification.get("false_accept_rate")
    return (
        f"{run.result('model')} on {run.result('data')}, mask {run.result('mask')}; threshold "
        f"{fmt_num(run.result('threshold'), 3)} ({run.result('threshold_source')}, target FAR "
        f"{fmt_num(verification.get('target_far'))}), false-accept rate "
        f"{'–' if far is None else f'{100 * far:.1f}%'} on {held.get('pairs', '–')} held-out impostor pairs "
        f"(95% CI {shown}); {run.result('eval_draws')} held-out draws per photo."
    )


def images(run: RunRecord) -> list[tuple[str, str]]:
    """(caption, data URI) of the run's face figures: the clean vs. patched faces, then each patch."""
    shown = []
    for name, png in sorted(run.images.items()):
        if name.startswith(FACE_IMAGE_PREFIX):
            caption = name[len(FACE_IMAGE_PREFIX) :].removesuffix(".png")
            shown.append((caption, "data:image/png;base64," + base64.b64encode(png).decode("ascii")))
    return shown
