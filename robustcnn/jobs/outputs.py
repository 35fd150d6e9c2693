"""What a battery leaves in a job's run: metrics per eps, the verdict, the robustness curve and the
adversarial examples (shared by the classifier job and the audit)."""

from __future__ import annotations

import math
from pathlib import Path

from robustcnn.evaluation.battery import BatteryResult
from robustcnn.tracking.records import battery_metric_rows
from robustcnn.tracking.store import RunLogger


def log_battery(
    run: RunLogger, battery: BatteryResult, out: Path | None, class_names: tuple[str, ...]
) -> None:
    """Metrics with the eps index as the step (and the eps value in the name), plots as artifacts."""
    eps = battery.threat.eps
    results = battery.to_dict()
    run.log_metric_rows(battery_metric_rows(results))
    run.set_tags({"verdict": battery.verdict, "stochastic": battery.stochastic})
    if out is None:
        return
    from robustcnn.report import figures as plots

    curve = plots.robustness_curve(
        out / "robustness_curve.png",
        eps,
        {k: [math.nan if v is None else v for v in battery.full_curve(k)] for k in battery.attacks},
        worst_case=battery.worst_case_robust_accuracy(),
        clean_accuracy=battery.clean_accuracy,
        norm=battery.threat.norm,
        title=f"robust accuracy ({battery.threat.norm})",
    )
    run.log_artifact(curve, "plots")
    # the strongest attack that ran at every eps (a reference-only attack has fewer columns to show)
    complete = [k for k, r in battery.attacks.items() if r.eps == eps] or list(battery.attacks)
    strongest = min(complete, key=lambda k: battery.attacks[k].robust_accuracy()[-1])
    result = battery.attacks[strongest]
    if result.adv_examples.numel():
        grid = plots.example_grid(
            out / "examples.png",
            result.clean_examples,
            result.adv_examples,
            result.eps,
            class_names=class_names,
        )
        run.log_artifact(grid, "plots")

