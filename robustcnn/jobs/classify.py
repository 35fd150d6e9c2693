"""The classifier job: config -> data -> model -> (cached) training -> battery -> MLflow + results.json.

Why this order: every check a user can fail (device, tracking store, cache folder, dataset files,
model name) runs before any training, so a bad input costs seconds, not an epoch; the MLflow run
is opened before training so that a job that dies is recorded as FAILED rather than missing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustcnn.attacks import Attack
from robustcnn.batching import CleanResult, clean_accuracy
from robustcnn.config import config_int
from robustcnn.data import Dataset
from robustcnn.defenses import Defense, build_defense
from robustcnn.device import check_threads, resolve_device
from robustcnn.evaluation import attributions
from robustcnn.evaluation.battery import BatterySettings, run_battery
from robustcnn.evaluation.settings import EvalSettings, plan_attacks
from robustcnn.jobs.inputs import bind_surrogates, check_model_config, load_data
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
from robustcnn.jobs.outputs import log_attributions, log_battery
from robustcnn.jobs.trained import TrainedModel, defended_config, obtain_model, resolve_defense
from robustcnn.models import count_parameters, model_label
from robustcnn.threat import ThreatModel
from robustcnn.tracking.records import (
    result_tags,
    summary_metric_rows,
    train_metric_rows,
)
from robustcnn.tracking.store import RunLogger, flatten
from robustcnn.tracking.sweep_link import SweepLink
from robustcnn.training.loop import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobPlan:
    """What a job's settings build before any work: validated once, then used by the job."""

    defense: Defense
    threat: ThreatModel | None
    attacks: list[Attack]
    evaluation: EvalSettings
    checks: BatterySettings


def check_classify_config(config: dict[str, Any], *, device: bool = True) -> JobPlan:
    """Every check of a classifier job's settings that needs no data, store or cache."""
    defense = build_defense(resolve_defense(config["defense"]))
    check_threads(config.get("threads"))
    config_int(config.get("seed", 0), "seed", minimum=0)
    if device:
        resolve_device(config.get("device", "auto"))
    defended_config(TrainConfig.from_mapping(config["training"]), defense)  # the defense's own settings too
    threat, attacks = plan_attacks(config)
    return JobPlan(
        defense=defense,
        threat=threat,
        attacks=attacks,
        evaluation=EvalSettings.from_mapping(config.get("eval")),
        checks=BatterySettings.from_mapping(config.get("checks")),
    )


def run_classify_job(
    config: dict[str, Any],
    plan: JobPlan,
    output_dir: str | Path | None = None,
    progress: bool = True,
    sweep: SweepLink | None = None,
    job_tags: dict[str, Any] | None = None,
    defense_label: str | None = None,
) -> dict[str, Any]:
    """Run one classifier job end to end (see :func:`robustcnn.jobs.dispatch.run_job`)."""
    ctx = prepare_job(config, output_dir, sweep, uses_cache=bool(config["training"].get("use_cache", True)))
    data = load_data(config)
    ctx = identify_job(ctx, {"data": data.info.identity})
    if ctx.previous is not None:
        return ctx.previous
    if plan.threat is not None:
        plan.threat.check_input_size(data.info.input_shape)
    check_model_config(config, data, plan.defense)

    label = defense_label or config["defense"]["name"]
    model_name = model_label(config["model"]["name"], config["model"])
    default_name = f"{model_name}-{label}-{data.info.name}"
    run_name = (config.get("tracking") or {}).get("run_name") or default_name
    tags = job_run_tags(
        ctx,
        {
            "model": config["model"]["name"],
            "model_label": model_name,
            "defense": config["defense"]["name"],
            "defense_label": label,
            "data": data.info.name,
        },
        job_tags,
    )
    params = flatten({k: v for k, v in config.items() if k != "hydra"})
    params.update(flatten(data.info.identity, prefix="data_identity."))
    with open_job_run(ctx, run_name, tags, params) as run:
        if plan.threat is not None and plan.evaluation.attributions:
            attributions.preload()  # captum loads while the model trains and is attacked
        trained = obtain_model(config, data, ctx.device, progress=progress)
        results = evaluate_model(run, ctx, plan, data, trained, label, progress)
        unwritten = record_results(run, ctx, results)
    raise_unrecorded(run, ctx, unwritten)
    train_seconds = results["train_seconds"]
    log.info(
        "%s: clean accuracy %.4f on %d test images (%s)",
        run_name,
        results["clean_accuracy"],
        results["n_test"],
        "cached weights" if trained.cache_hit else f"trained in {train_seconds:.1f}s",
    )
    return results


def evaluate_model(
    run: RunLogger,
    ctx: JobContext,
    plan: JobPlan,
    data: Dataset,
    trained: TrainedModel,
    label: str,
    progress: bool,
) -> dict[str, Any]:
    """Clean accuracy, then the attack battery (when attacks were selected), logged as they finish."""
    config, evaluation, device = ctx.config, plan.evaluation, ctx.device
    # a cached model's curves come from the cache entry, so every run of a job shows them
    history = trained.train.history if trained.train is not None else trained.meta.get("history") or []
    run.log_metric_rows(train_metric_rows(history))

    x_test, y_test = data.x_test, data.y_test
    if evaluation.max_samples is not None:
        x_test, y_test = x_test[: evaluation.max_samples], y_test[: evaluation.max_samples]
    amp = bool(config["training"].get("amp", True))
    clean = clean_accuracy(trained.model, x_test, y_test, evaluation.batch_size, device, amp)
    results = clean_results(ctx, data, trained, clean, label, history, run.run_id)
    results["n_test"] = int(y_test.shape[0])
    run.log_metric_rows(summary_metric_rows(results))
    run.set_tags(result_tags(results))
    run.flush()  # the training curves and clean accuracy show in the UI while the attacks run
    if plan.threat is not None:
        bind_surrogates(plan.attacks, config, data, device, progress)
        n_attack = evaluation.attack_samples or int(y_test.shape[0])
        battery = run_battery(
            trained.model,
            x_test[:n_attack],
            y_test[:n_attack],
            plan.threat,
            plan.attacks,
            undefended=config["defense"]["name"] == "none",
            settings=plan.checks,
            clean_accuracy=None,
            device=device,
            progress=progress,
        )
        results.update(battery.to_dict())
        log_battery(run, battery, ctx.out, data.info.class_names)
        if evaluation.attributions:
            kept = (x_test[:n_attack], y_test[:n_attack])
            found = log_attributions(run, trained.model, battery, *kept, ctx.out, data.info.class_names)
            if found is not None:
                results["attributions"] = found
        log.info(
            "verdict %s; worst-case robust accuracy %s",
            battery.verdict,
            [round(v, 3) for v in battery.worst_case_robust_accuracy()],
        )
    return results


def clean_results(
    ctx: JobContext,
    data: Dataset,
    trained: TrainedModel,
    clean: CleanResult,
    label: str,
    history: list[dict[str, Any]],
    run_id: str,
) -> dict[str, Any]:
    """results.json before the battery: what was trained, how, and its clean accuracy."""
    config = ctx.config
    meta = trained.meta
    return {
        "clean_accuracy": clean.accuracy,
        "model": config["model"]["name"],
        "model_label": model_label(config["model"]["name"], config["model"]),
        "data": data.info.name,
        "defense": config["defense"]["name"],
        "defense_label": label,
        "seed": ctx.seed,
        "device": str(ctx.device),
        "parameters": count_parameters(trained.model),
        "weights_key": trained.key,
        "defense_params": trained.defense.params(),
        "defense_report": meta.get("defense_report", {}),
        "cache_hit": trained.cache_hit,
        "train_seconds": trained.train.seconds if trained.train else meta.get("train_seconds"),
        "train_images_per_s": trained.train.images_per_s if trained.train else meta.get("train_images_per_s"),
        "eval_images_per_s": clean.images_per_s,
        "data_identity": data.info.identity,
        "environment": environment_info(ctx.device),
        "train_history": history,
        "mlflow_run_id": run_id,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
