"""What a battery leaves in a job's run: metrics per eps, the verdict, and the adversarial examples
(shared by the classifier job and the audit).

Why no pictures here: the robustness curve is in the metrics and results.json, and the example grid
is kept as data (:mod:`robustcnn.report.examples`); the dashboard draws both when it is built, so a
sweep of many small jobs does not pay matplotlib per cell.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustcnn.evaluation.attributions import explain
from robustcnn.evaluation.battery import BatteryResult
from robustcnn.report.aligned import GRADIENTS_FILE, GradientSet
from robustcnn.report.examples import EXAMPLES_FILE, ExampleSet
from robustcnn.report.heatmaps import ATTRIBUTIONS_PNG, attribution_grid
from robustcnn.tracking.records import attribution_metric_rows, battery_metric_rows
from robustcnn.tracking.store import RunLogger

log = logging.getLogger(__name__)


def log_battery(
    run: RunLogger, battery: BatteryResult, out: Path | None, class_names: tuple[str, ...]
) -> None:
    """Metrics with the eps index as the step (and the eps value in the name), the examples as data."""
    run.log_metric_rows(battery_metric_rows(battery.to_dict()))
    run.set_tags({"verdict": battery.verdict, "stochastic": battery.stochastic, "evidence": battery.evidence})
    examples = strongest_examples(battery, class_names)
    if out is not None and examples is not None:
        run.log_artifact(examples.save(out / EXAMPLES_FILE), "plots")


def strongest_examples(battery: BatteryResult, class_names: tuple[str, ...]) -> ExampleSet | None:
    """The kept examples of the strongest attack that ran at every eps (None when none were kept).

    A reference-only attack (run at fewer radii) has fewer columns to show, so it is passed over
    unless nothing else ran.
    """
    eps = battery.threat.eps
    complete = [k for k, r in battery.attacks.items() if r.eps == eps] or list(battery.attacks)
    strongest = min(complete, key=lambda k: battery.attacks[k].robust_accuracy()[-1])
    result = battery.attacks[strongest]
    if not result.adv_examples.numel():
        return None
    return ExampleSet(result.clean_examples, result.adv_examples, tuple(result.eps), class_names, strongest)


def log_attributions(
    run: RunLogger,
    model: nn.Module,
    battery: BatteryResult,
    images: Tensor,
    labels: Tensor,
    out: Path | None,
    class_names: tuple[str, ...],
) -> dict[str, Any] | None:
    """Attribution maps of the kept examples, clean vs adversarial at the reference eps (see
    :mod:`robustcnn.evaluation.attributions`): the grid as a PNG artifact, the stability as metrics,
    the clean examples' input gradients as data (the dashboard's per-defense view).

    ``images``/``labels``: the attacked images' first rows, whose labels the kept examples need.
    Returns what results.json keeps under ``attributions`` (None when no example was kept).
    """
    examples = strongest_examples(battery, class_names)
    if examples is None:
        return None
    k = examples.clean.shape[0]
    if not torch.equal(examples.clean, images[:k].detach().cpu()):  # a label must never be guessed
        log.warning("the kept examples are not the first attacked images: attribution maps skipped")
        return None
    eps = list(examples.eps)
    index = eps.index(battery.reference_eps) if battery.reference_eps in eps else len(eps) - 1
    found = explain(
        model, examples.clean, examples.adversarial[index], labels[:k], eps=eps[index], attack=examples.attack
    )
    summary = found.summary()
    run.log_metric_rows(attribution_metric_rows({"attributions": summary}))
    if out is not None:
        png = attribution_grid(
            out / ATTRIBUTIONS_PNG,
            found.clean,
            found.adversarial,
            found.maps,
            found.predictions,
            found.labels,
            class_names,
            found.per_example,
        )
        run.log_artifact(png, "plots")
        if found.gradients is not None:
            kept = GradientSet(found.clean, found.labels, found.gradients)
            run.log_artifact(kept.save(out / GRADIENTS_FILE), "plots")
    return summary
