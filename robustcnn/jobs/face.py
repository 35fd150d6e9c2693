"""One face patch study: gallery -> recognizer -> threshold -> patches -> held-out evaluation -> MLflow.

Why a job of its own: a face study has no classifier to train and no eps curve; it attacks a
pretrained face recognizer with physical patches (eyeglass frames, stickers, hat bands) and measures
dodging and impersonation on held-out physical draws. It shares everything else with the classifier
job (``runner.prepare_job``: device, store and folder checks, dedupe and resume, run.json/results.json,
store-loss handling and ``robustcnn sync``), so a sweep can mix both.

This module is only the job's lifecycle (prepare, open the run, run the study, record); the study's
settings, enrolment, calibration, attacks and artifacts live in :mod:`robustcnn.face`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any  # Any: the job's config and its JSON results

import torch

from robustcnn.face.artifacts import face_titles, write_face_artifacts
from robustcnn.face.calibration import calibrate_apart, check_fit_pairs
from robustcnn.face.enrolment import Enrolment, enrol, load_faces
from robustcnn.face.gallery import FaceGallery
from robustcnn.face.masks import area_percent
from robustcnn.face.settings import FacePlan, check_face_config, study_identities
from robustcnn.face.study import FaceStudyResult, run_face_study
from robustcnn.face.transfer import prepare_holdouts
from robustcnn.jobs.lifecycle import (
    JobContext,
    environment_info,
    identify_job,
    job_run_tags,
    open_job_run,
    prepare_job,
    raise_unrecorded,
    record_results,
)
from robustcnn.models.face.loading import load_face_recognizer
from robustcnn.models.face.recognizer import DEFAULT_THRESHOLD, Calibration, FaceRecognizer
from robustcnn.report.heatmaps import FACE_SALIENCY_PNG, face_saliency_grid
from robustcnn.tracking.records import face_metric_rows
from robustcnn.tracking.store import RunLogger, flatten
from robustcnn.tracking.sweep_link import SweepLink

#: ``FacePlan`` and ``check_face_config`` live in :mod:`robustcnn.face.settings`; they are
#: re-exported here for the dispatcher, which checks every job kind's config through its job module.
__all__ = ["FacePlan", "check_face_config", "run_face_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _FaceInputs:
    """What a face job settles before its run opens, so a missing photo, weights file or unknown
    identity name is one line and never a FAILED run."""

    plan: FacePlan
    data: dict[str, Any]
    gallery: FaceGallery
    recognizer: FaceRecognizer
    ensemble: list[FaceRecognizer]  # optimised against besides ``recognizer`` (thresholds fitted later)
    holdouts: list[FaceRecognizer]  # scored on, never optimised against (their thresholds fitted later)
    enrolment: Enrolment
    attackers: list[int]
    targets: list[int]


def _load_inputs(config: dict[str, Any], plan: FacePlan, ctx: JobContext) -> _FaceInputs:
    """The photos, the recognizer (at face-api's published threshold until calibrated), who attacks whom."""
    data = dict(config["data"])
    gallery = load_faces(data)
    recognizer = load_face_recognizer(plan.recognizer, threshold=DEFAULT_THRESHOLD, device=ctx.device)
    ensemble = [load_face_recognizer(name, device=ctx.device) for name in plan.ensemble[1:]]
    holdouts = [load_face_recognizer(name, device=ctx.device) for name in plan.holdout_recognizers]
    enrolment = enrol(gallery, seed=ctx.seed)
    attackers, targets = study_identities(plan, enrolment.names)
    check_fit_pairs(gallery.identities, {enrolment.names[i] for i in [*attackers, *targets]}, plan.threshold)
    return _FaceInputs(plan, data, gallery, recognizer, ensemble, holdouts, enrolment, attackers, targets)


def _input_identity(inputs: _FaceInputs) -> dict[str, Any]:
    """What the study's results depend on beyond its config: the crops (photos, the boxes file,
    the margin) and the recognizer's weights file (a re-converted or replaced asset)."""
    return {
        "data": inputs.gallery.identity,
        "recognizer_sha256": inputs.recognizer.weights_sha256,
        "ensemble_sha256": {r.name: r.weights_sha256 for r in inputs.ensemble},
        "holdout_sha256": {r.name: r.weights_sha256 for r in inputs.holdouts},
    }


def _run_name(config: dict[str, Any], inputs: _FaceInputs) -> str:
    """``tracking.run_name``, else recognizer(s)-mask-data (what tells a sweep's face runs apart)."""
    chosen = (config.get("tracking") or {}).get("run_name")
    attacked = "+".join(r.name for r in (inputs.recognizer, *inputs.ensemble))
    return chosen or f"{attacked}-{inputs.plan.mask_name}-{inputs.data['name']}"


def _run_tags(ctx: JobContext, inputs: _FaceInputs, job_tags: dict[str, Any] | None) -> dict[str, Any]:
    """The tags every run gets, plus what filters face runs in the MLflow UI: model, data, mask."""
    study = {
        "task": "face_patch",
        "model": inputs.recognizer.name,
        "data": inputs.data["name"],
        "mask": inputs.plan.mask_name,
    }
    return job_run_tags(ctx, study, job_tags)


def _run_params(config: dict[str, Any], gallery: FaceGallery) -> dict[str, Any]:
    """The run's params: the settings that define the study, and the identity of its photos."""
    params = flatten({k: v for k, v in config.items() if k in ("task", "data", "face", "seed", "device")})
    params.update(flatten(gallery.identity, prefix="data_identity."))
    return params


def _set_threshold(inputs: _FaceInputs) -> tuple[Calibration, dict[str, Any]]:
    """Fit the threshold on impostor pairs of people outside the study (``face.threshold`` wins over
    the fit) and measure it on the others; logged, since every success rate depends on it."""
    plan, recognizer, names = inputs.plan, inputs.recognizer, inputs.enrolment.names
    study = {names[i] for i in [*inputs.attackers, *inputs.targets]}
    calibration, report = calibrate_apart(
        recognizer, inputs.gallery, study, inputs.data, plan.far, plan.threshold
    )
    recognizer.threshold = calibration.threshold
    held = report["held_out"]
    log.info(
        "face threshold %.4f (%s); false accepts on %d held-out impostor pairs: %.1f%% (95%% CI %s); "
        "below the published 0.6: %.1f%%",
        recognizer.threshold,
        f"fitted at FAR {plan.far:.3g} apart from the study" if plan.threshold is None else "face.threshold",
        held["pairs"],
        100 * (held["false_accept_rate"] or 0.0),
        "none" if held["interval"] is None else "[{:.3f}, {:.3f}]".format(*held["interval"]),
        100 * (report["published"]["false_accept_rate"] or 0.0),
    )
    return calibration, report


def _run_study(inputs: _FaceInputs, ctx: JobContext) -> FaceStudyResult:
    """Every patch of the plan, optimised and judged on the enrolment's split of each person's photos."""
    plan, device, names = inputs.plan, ctx.device, inputs.enrolment.names
    study = {names[i] for i in [*inputs.attackers, *inputs.targets]}
    # every other recognizer gets its own threshold, fitted apart from the study like the attacked one's
    ensemble, holdouts = (
        prepare_holdouts(group, inputs.gallery, inputs.enrolment, study, inputs.data, plan.far, device)
        for group in (inputs.ensemble, inputs.holdouts)
    )
    return run_face_study(
        inputs.recognizer,
        inputs.enrolment,
        inputs.attackers,
        inputs.targets,
        plan.mask.to(device),
        plan.patch,
        plan.eval_variation,
        plan.eval_draws,
        seed=ctx.seed,
        holdouts=holdouts,
        ensemble=[member.recognizer for member in ensemble],
    )


def _results(
    inputs: _FaceInputs,
    ctx: JobContext,
    run: RunLogger,
    report: dict[str, Any],
    study: FaceStudyResult,
    study_seconds: float,
) -> dict[str, Any]:
    """results.json: what was attacked and how, the threshold and its report, the study's metrics,
    then the bookkeeping (seed, device, timing, data identity, environment, run id)."""
    plan, recognizer, names = inputs.plan, inputs.recognizer, inputs.enrolment.names
    return {
        "task": "face_patch",
        "model": recognizer.name,
        "holdout_recognizers": [r.name for r in inputs.holdouts],
        "data": inputs.data["name"],
        "mask": plan.mask_name,
        "mask_area_percent": area_percent(plan.mask),
        "identities": len(names),
        "faces": len(inputs.gallery),
        "attackers": [names[a] for a in inputs.attackers],
        "targets": [names[t] for t in inputs.targets],
        "threshold": recognizer.threshold,
        "threshold_source": "calibrated" if plan.threshold is None else "config",
        "false_accept_rate": report["false_accept_rate"],
        "false_accept_interval": report["false_accept_interval"],
        "verification": report,
        "patch_settings": plan.patch.to_dict(),
        "eval_variation": plan.eval_variation.to_dict(),
        "eval_draws": plan.eval_draws,
        **study.metrics,
        "seed": ctx.seed,
        "device": str(ctx.device),
        "study_seconds": study_seconds,
        "data_identity": inputs.gallery.identity,
        "environment": environment_info(ctx.device),
        "mlflow_run_id": run.run_id,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _log_to_run(
    run: RunLogger,
    ctx: JobContext,
    inputs: _FaceInputs,
    results: dict[str, Any],
    study: FaceStudyResult,
    calibration: Calibration,
) -> None:
    """The metrics and the headline tag in the run; the artifacts on disk and in the run's plots/."""
    run.log_metric_rows(face_metric_rows(results))
    run.set_tags({
        "dodging_success_rate": results.get("dodging_success_rate"),
        "dodging_success_rate_held_out_photos": results.get("dodging_success_rate_held_out_photos"),
    })  # fmt: skip
    if ctx.out is None:
        return
    artifacts = write_face_artifacts(
        ctx.out, study, inputs.plan, calibration, DEFAULT_THRESHOLD
    )
    grid = _saliency_grid(ctx.out, study, inputs.plan.keep_faces)
    artifacts += [grid] if grid is not None else []
    for path in artifacts:
        relative = path.parent.relative_to(ctx.out)
        run.log_artifact(path, "plots" if str(relative) == "." else f"plots/{relative}")


def _saliency_grid(out: Path, study: FaceStudyResult, keep: int) -> Path | None:
    """The recognizer's saliency on the clean and the patched face of the first ``keep`` patches (PNG),
    drawn like the classifier's attribution grid; None when the study kept no patch."""
    kept = list(study.saliency)[:keep]
    if not kept:
        return None
    found = [study.saliency[key] for key in kept]
    clean = torch.stack([study.clean_faces[key] for key in kept])
    faces = (clean, torch.stack([study.adversarial_faces[key] for key in kept]))
    return face_saliency_grid(
        out / FACE_SALIENCY_PNG,
        faces,
        (torch.stack([f.clean for f in found]), torch.stack([f.patched for f in found])),
        face_titles(kept),
        [(f.clean_mass_in_patch, f.patched_mass_in_patch) for f in found],
    )


def _log_summary(run_name: str, results: dict[str, Any]) -> None:
    """The study's headline, one line per figure (what was held out, next to its baselines)."""
    for figure in results["figures"]:
        log.info(
            "%s: %s %.3f (held_out: %s; random patch %.3f, no patch %.3f; %d/%d patches beat the baseline)",
            run_name,
            figure["goal"],
            figure["success_rate"],
            figure["held_out"],
            figure["random_patch_success_rate"],
            figure["clean_success_rate"],
            figure["beat_baseline"],
            figure["patches"],
        )
    for name, entry in results["transfer"].items():
        for row in entry["figures"]:
            log.info(
                "%s: transfer to %s (never optimised against; threshold %.3f, FAR %s): %s %.3f "
                "(held_out: %s; random patch %.3f, no patch %.3f; %d/%d patches beat the baseline)",
                run_name, name, entry["threshold"],
                "n/a" if entry["false_accept_rate"] is None else f"{entry['false_accept_rate']:.3f}",
                row["goal"], row["success_rate"], row["held_out"], row["random_patch_success_rate"],
                row["clean_success_rate"], row["beat_baseline"], row["patches"],
            )  # fmt: skip


def run_face_job(
    config: dict[str, Any],
    output_dir: str | Path | None,
    *,
    progress: bool = True,
    sweep: SweepLink | None = None,
    job_tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one face patch study end to end; results in ``output_dir/results.json`` and MLflow."""
    plan = check_face_config(config)
    ctx = prepare_job(config, output_dir, sweep, uses_cache=False)
    inputs = _load_inputs(config, plan, ctx)  # before the run opens: a missing photo or weights is one line
    ctx = identify_job(ctx, _input_identity(inputs))
    if ctx.previous is not None:
        return ctx.previous
    run_name = _run_name(config, inputs)
    tags = _run_tags(ctx, inputs, job_tags)
    with open_job_run(ctx, run_name, tags, _run_params(config, inputs.gallery)) as run:
        started = time.perf_counter()
        calibration, report = _set_threshold(inputs)
        study = _run_study(inputs, ctx)
        results = _results(inputs, ctx, run, report, study, time.perf_counter() - started)
        _log_to_run(run, ctx, inputs, results, study, calibration)
        unwritten = record_results(run, ctx, results)
    raise_unrecorded(run, ctx, unwritten)
    _log_summary(run_name, results)
    return results
