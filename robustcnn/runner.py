"""One job: config -> data -> model -> (cached) training -> evaluation -> MLflow + results.json.

Why this order: every check a user can fail (device, tracking store, cache folder, dataset files,
model name) runs before any training, so a bad input costs seconds, not an epoch; the MLflow run
is opened before training so that a job that dies is recorded as FAILED rather than missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robustcnn import __version__
from robustcnn.attacks import Attack, Transfer, attack_specs, build_attack
from robustcnn.battery import BatteryResult, BatterySettings, run_battery
from robustcnn.cache import WeightCache
from robustcnn.config import config_bool, config_int, config_section
from robustcnn.data import Dataset, load_dataset
from robustcnn.defenses import Defense, build_defense
from robustcnn.device import check_threads, resolve_device, seed_everything, set_threads
from robustcnn.errors import ConfigError, TrackingError
from robustcnn.evaluation import clean_accuracy
from robustcnn.hashing import code_version, job_key
from robustcnn.models import count_parameters
from robustcnn.preflight import OutputError, check_output_folder, write_failure
from robustcnn.resume import JOB_KEY_TAG, find_finished
from robustcnn.run_record import battery_metric_rows, result_tags, summary_metric_rows, train_metric_rows
from robustcnn.sweep import SweepLink
from robustcnn.threat import ThreatModel
from robustcnn.tracking import (
    RunLogger,
    check_store_writable,
    ensure_experiment,
    flatten,
    resolve_tracking_uri,
    start_run,
)
from robustcnn.trained import make_model, obtain_model, resolve_defense
from robustcnn.training import TrainConfig

log = logging.getLogger(__name__)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolve interpolations into a plain dict; a missing mandatory value becomes a ConfigError."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "a value"
        detail = " ".join(str(exc.msg if hasattr(exc, "msg") else exc).split())
        raise ConfigError(
            f"config value {key} is missing or invalid ({detail}); set it on the command line, e.g. {key}=..."
        ) from exc


def load_data(config: dict[str, Any]) -> Dataset:
    section = dict(config["data"])
    name = section.pop("name", None)
    if not name:
        raise ConfigError("the data config has no 'name'; pick a preset such as data=mnist5k")
    if name in ("faces", "face_folder"):
        raise ConfigError(
            f"data={name} holds face crops for the face patch study, not a classifier dataset; "
            "run it with task=face_patch (e.g. experiment=face_smoke data=" + name + ")"
        )
    return load_dataset(name, **section)


def environment_info(device: torch.device) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "robustcnn": __version__,
        "device": str(device),
        "threads": torch.get_num_threads(),  # what the launcher / `threads` left torch (see README)
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@dataclass(frozen=True)
class EvalSettings:
    """The ``eval`` section, checked: how many test images, in which batches."""

    batch_size: int = 1000
    max_samples: int | None = None  # None: the whole test split
    attack_samples: int | None = None  # None: every evaluated image
    attack_batch_size: int = 500
    amp: bool = False
    keep_examples: int = 8

    @classmethod
    def from_mapping(cls, section: Any) -> EvalSettings:
        known = [f.name for f in dataclasses.fields(cls)]
        values = config_section(section, "eval", known)

        def count(key: str, minimum: int = 1) -> int | None:
            value = values.get(key, getattr(cls, key))
            if value is None and key in ("max_samples", "attack_samples"):
                return None
            hint = f" (or null for all); e.g. eval.{key}=1000" if key.endswith("samples") else ""
            return config_int(value, f"eval.{key}", minimum=minimum, hint=hint)

        return cls(
            batch_size=count("batch_size"),  # type: ignore[arg-type]
            max_samples=count("max_samples"),
            attack_samples=count("attack_samples"),
            attack_batch_size=count("attack_batch_size"),  # type: ignore[arg-type]
            amp=config_bool(values.get("amp", cls.amp), "eval.amp"),
            keep_examples=count("keep_examples", minimum=0),  # type: ignore[arg-type]
        )


def plan_attacks(config: dict[str, Any]) -> tuple[ThreatModel | None, list[Attack]]:
    """Validate the threat model and build every selected attack before any training starts."""
    specs = attack_specs(config.get("attack"))
    if not specs:
        return None, []
    threat = ThreatModel.from_mapping(config.get("threat") or {})
    settings = EvalSettings.from_mapping(config.get("eval"))
    common = {
        "seed": config.get("seed", 0),
        "batch_size": settings.attack_batch_size,
        "amp": settings.amp,
        "keep_examples": settings.keep_examples,
    }
    attacks = [build_attack(spec, common) for spec in specs]
    if threat.knowledge == "black_box":
        white = [a.name for a in attacks if a.uses_gradients]
        if white:
            raise ConfigError(
                f"threat.knowledge=black_box excludes the gradient attacks {white}; "
                "select query/transfer attacks, e.g. attack=[square,transfer]"
            )
    return threat, attacks


@dataclass(frozen=True)
class JobPlan:
    """What a job's settings build before any work: validated once, then used by the job."""

    defense: Defense
    threat: ThreatModel | None
    attacks: list[Attack]
    evaluation: EvalSettings
    checks: BatterySettings


def is_face_task(config: dict[str, Any]) -> bool:
    """A face patch study (``task=face_patch``) rather than a classifier battery (``task=classify``)."""
    task = config.get("task", "classify")
    if task not in ("classify", "face_patch"):
        raise ConfigError(f"task={task!r} is unknown; use task=classify or task=face_patch")
    return task == "face_patch"


def check_config(config: dict[str, Any], *, device: bool = True) -> Any:
    """Every check of a job's settings that needs no data, store or cache: bad values fail here.

    ``run_job`` calls it first and runs on what it returns; ``robustcnn run`` calls it on the
    composed config before Hydra starts (for a sweep, on its first cell), so a bad value never
    opens an MLflow run. A sweep's jobs may run on other machines (SLURM, Ray), so there
    ``device=False`` leaves the device to them.
    """
    if is_face_task(config):
        from robustcnn.face_job import check_face_config

        return check_face_config(config, device=device)
    defense = build_defense(resolve_defense(config["defense"]))
    check_threads(config.get("threads"))
    config_int(config.get("seed", 0), "seed", minimum=0)
    if device:
        resolve_device(config.get("device", "auto"))
    TrainConfig.from_mapping(config["training"])
    threat, attacks = plan_attacks(config)
    return JobPlan(
        defense=defense,
        threat=threat,
        attacks=attacks,
        evaluation=EvalSettings.from_mapping(config.get("eval")),
        checks=BatterySettings.from_mapping(config.get("checks")),
    )


def check_model_config(config: dict[str, Any], data: Dataset, defense: Defense) -> None:
    """Build the model once before the run opens, so a bad ``model.*`` value is one line, not a FAILED run.

    The build runs under a forked random state: the model trained later draws the same initial
    weights as it would without this check (seeded runs stay reproducible).
    """
    with torch.random.fork_rng(devices=[]):
        make_model(config, data, defense.model_overrides())


def bind_surrogates(
    attacks: list[Attack], config: dict[str, Any], data: Dataset, device: torch.device, progress: bool
) -> None:
    """Train (or load from the cache) each transfer attack's surrogate: same data, own seed."""
    for attack in attacks:
        if isinstance(attack, Transfer):
            surrogate_config = {
                **config,
                "model": {"name": attack.surrogate, "dropout": 0.0},
                "defense": {"name": "none"},
                "seed": int(config.get("seed", 0)) + 1,
            }
            trained = obtain_model(surrogate_config, data, device, progress=progress)
            attack.bind(trained.model)


def log_battery(run: Any, battery: BatteryResult, out: Path | None, class_names: tuple[str, ...]) -> None:
    """Metrics with the eps index as the step (and the eps value in the name), plots as artifacts."""
    eps = battery.threat.eps
    results = battery.to_dict()
    run.log_metric_rows(battery_metric_rows(results))
    run.set_tags({"verdict": battery.verdict, "stochastic": battery.stochastic})
    if out is None:
        return
    from robustcnn import plots

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


def write_json(out: Path | None, name: str, data: dict[str, Any]) -> None:
    """A JSON file in the job's output folder (``results.json``, ``run.json``, ``config.json``).

    Why they matter: they outlive the tracking store; ``robustcnn sync`` rebuilds a run from them
    when the store was unreachable while the job ran. Written atomically (never half a file).
    """
    if out is None:
        return
    target = out / name
    tmp = target.with_name(f".{name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(target, exc) from exc


def write_results(out: Path | None, results: dict[str, Any]) -> None:
    """results.json next to the job's output: kept even when the tracking store is gone."""
    write_json(out, "results.json", results)


def store_lost_error(uri: str, run: RunLogger, out: Path | None) -> TrackingError:
    """The one line a job prints when the store failed while it ran (its results are on disk)."""
    where = f"{out}/results.json" if out is not None else "no output folder (output_dir was None)"
    fix = f"`robustcnn sync {out}`" if out is not None else "re-running the job"
    return TrackingError(
        f"the MLflow store {uri} failed during the job ({run.lost}); the job finished and its results "
        f"are in {where}; once the store is back, {fix} imports them (or re-run the same command)"
    )


@dataclass
class JobContext:
    """What every job kind settles before it opens a run: device, store, output folder, job key."""

    started: float
    config: dict[str, Any]
    seed: int
    device: torch.device
    uri: str
    experiment: str
    experiment_id: str
    out: Path | None
    key: str
    sweep: SweepLink | None
    previous: dict[str, Any] | None  # a finished identical job's results (reused unless force=true)


def prepare_job(
    config: dict[str, Any], output_dir: str | Path | None, sweep: SweepLink | None, *, uses_cache: bool
) -> JobContext:
    """Threads, seed, device, tracking store, cache and output folder checks, then the dedupe lookup.

    Shared by every kind of job (classifier battery, face patch study) so they fail, resume and
    reuse results the same way.
    """
    started = time.perf_counter()
    set_threads(config.get("threads"))
    seed = int(config.get("seed", 0))
    seed_everything(seed)
    device = resolve_device(config.get("device", "auto"))
    tracking = config.get("tracking") or {}
    experiment = tracking.get("experiment") or "robustcnn"
    uri = sweep.tracking_uri if sweep else resolve_tracking_uri(tracking.get("uri"))
    check_store_writable(uri)
    if uses_cache:
        WeightCache(config["paths"]["cache_dir"]).ensure_writable()
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        check_output_folder(out, "the job's output folder", "hydra.run.dir (hydra.sweep.dir in a sweep)")
        out.mkdir(parents=True, exist_ok=True)
    key = job_key(config)
    experiment_id = sweep.experiment_id if sweep else ensure_experiment(uri, experiment)
    previous = None
    if not config.get("force", False):
        previous = find_finished(uri, experiment_id, key)
        if previous is not None:
            log.info(
                "identical job already finished in run %s: reused (force=true runs it again)",
                previous["reused_from"],
            )
            write_results(out, previous)
    return JobContext(
        started, config, seed, device, uri, experiment, experiment_id, out, key, sweep, previous
    )


def job_run_tags(ctx: JobContext, tags: dict[str, Any], job_tags: dict[str, Any] | None) -> dict[str, Any]:
    """The tags every run starts with: version, job key, code version, the sweep cell's tags."""
    return {
        "robustcnn.version": __version__,
        **tags,
        JOB_KEY_TAG: ctx.key,
        "robustcnn.code_version": code_version(),
        **(job_tags or {}),
    }


def record_run_start(
    run: RunLogger, ctx: JobContext, run_name: str, tags: dict[str, Any], params: dict[str, Any]
) -> None:
    """config.json and run.json on disk (what ``robustcnn sync`` needs), params and config in the run."""
    write_json(ctx.out, "config.json", ctx.config)
    write_json(
        ctx.out,
        "run.json",
        {
            "tracking_uri": ctx.uri,
            "experiment": ctx.experiment,
            "experiment_id": ctx.experiment_id,
            "run_id": run.run_id,
            "run_name": run_name,
            "parent_run_id": ctx.sweep.parent_run_id if ctx.sweep else None,
            "tags": tags,
            "params": {k: str(v) for k, v in params.items()},
        },
    )
    run.log_params(params)
    run.log_dict(ctx.config, "config.json")


@contextlib.contextmanager
def open_job_run(
    ctx: JobContext, run_name: str, tags: dict[str, Any], params: dict[str, Any]
) -> Iterator[RunLogger]:
    """The job's MLflow run (under the sweep's parent, if any), its params and files recorded first."""
    with start_run(
        ctx.uri,
        ctx.experiment,
        run_name,
        tags,
        experiment_id=ctx.experiment_id,
        parent_run_id=ctx.sweep.parent_run_id if ctx.sweep else None,
    ) as run:
        record_run_start(run, ctx, run_name, tags, params)
        yield run


def record_results(run: RunLogger, ctx: JobContext, results: dict[str, Any]) -> OutputError | None:
    """results.json on disk and in the run; a disk failure is returned (raised after the run ends)."""
    results["job_seconds"] = time.perf_counter() - ctx.started  # wall time, bookkeeping included
    unwritten: OutputError | None = None
    try:
        write_results(ctx.out, results)
    except OutputError as exc:  # e.g. the disk filled up: the store still gets the results
        unwritten = exc
    run.log_dict(results, "results.json")
    return unwritten


def raise_unrecorded(run: RunLogger, ctx: JobContext, unwritten: OutputError | None) -> None:
    """After the run closed: say where results are when the disk or the store failed."""
    if unwritten is not None:
        where = f"MLflow run {run.run_id} (results.json)" if run.lost is None else "no store either"
        raise OutputError(f"{unwritten}; the job's results are in {where}")
    if run.lost is not None:
        raise store_lost_error(ctx.uri, run, ctx.out)


def run_job(
    cfg: DictConfig | dict[str, Any],
    output_dir: str | Path | None = None,
    progress: bool = True,
    sweep: SweepLink | None = None,
    job_tags: dict[str, Any] | None = None,
    defense_label: str | None = None,
) -> dict[str, Any]:
    """Run one job end to end and return its results (also written to ``output_dir/results.json``).

    A job whose identical config (and code) already finished in the same experiment is not run
    again unless ``force=true``: its results are linked (``reused_from``) and returned.
    ``sweep`` puts the run under a sweep's parent run; ``job_tags`` (Hydra's job number and
    overrides) make the sweep's cells tell apart in the MLflow UI; ``defense_label`` (the Hydra
    preset and its overrides, :func:`robustcnn.sweep.defense_label`) names the defense in run names,
    summaries and the report, where ``defense.name`` is only its type.
    """
    config = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    if is_face_task(config):
        from robustcnn.face_job import run_face_job

        return run_face_job(config, output_dir, progress=progress, sweep=sweep, job_tags=job_tags)
    plan = check_config(config)
    threat, attacks, evaluation = plan.threat, plan.attacks, plan.evaluation
    ctx = prepare_job(
        config, output_dir, sweep, uses_cache=bool(config["training"].get("use_cache", True))
    )
    if ctx.previous is not None:
        return ctx.previous
    seed, device, out = ctx.seed, ctx.device, ctx.out
    data = load_data(config)
    if threat is not None:
        threat.check_input_size(data.info.input_shape)
    check_model_config(config, data, plan.defense)

    label = defense_label or config["defense"]["name"]
    default_name = f"{config['model']['name']}-{label}-{data.info.name}"
    run_name = (config.get("tracking") or {}).get("run_name") or default_name
    tags = job_run_tags(
        ctx,
        {
            "model": config["model"]["name"],
            "defense": config["defense"]["name"],
            "defense_label": label,
            "data": data.info.name,
        },
        job_tags,
    )
    params = flatten({k: v for k, v in config.items() if k != "hydra"})
    params.update(flatten(data.info.identity, prefix="data_identity."))
    with open_job_run(ctx, run_name, tags, params) as run:

        trained = obtain_model(config, data, device, progress=progress)
        # a cached model's curves come from the cache entry, so every run of a job shows them
        history = trained.train.history if trained.train is not None else trained.meta.get("history") or []
        run.log_metric_rows(train_metric_rows(history))

        x_test, y_test = data.x_test, data.y_test
        if evaluation.max_samples is not None:
            x_test, y_test = x_test[: evaluation.max_samples], y_test[: evaluation.max_samples]
        amp = bool(config["training"].get("amp", True))
        clean = clean_accuracy(trained.model, x_test, y_test, evaluation.batch_size, device, amp)

        train_seconds = trained.train.seconds if trained.train else trained.meta.get("train_seconds")
        results: dict[str, Any] = {
            "clean_accuracy": clean.accuracy,
            "model": config["model"]["name"],
            "data": data.info.name,
            "defense": config["defense"]["name"],
            "defense_label": label,
            "seed": seed,
            "device": str(device),
            "n_test": int(y_test.shape[0]),
            "parameters": count_parameters(trained.model),
            "weights_key": trained.key,
            "defense_params": trained.defense.params(),
            "defense_report": trained.meta.get("defense_report", {}),
            "cache_hit": trained.cache_hit,
            "train_seconds": train_seconds,
            "train_images_per_s": trained.train.images_per_s
            if trained.train
            else trained.meta.get("train_images_per_s"),
            "eval_images_per_s": clean.images_per_s,
            "data_identity": data.info.identity,
            "environment": environment_info(device),
            "train_history": history,
            "mlflow_run_id": run.run_id,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        run.log_metric_rows(summary_metric_rows(results))
        run.set_tags(result_tags(results))
        if threat is not None:
            bind_surrogates(attacks, config, data, device, progress)
            n_attack = evaluation.attack_samples or int(y_test.shape[0])
            battery = run_battery(
                trained.model,
                x_test[:n_attack],
                y_test[:n_attack],
                threat,
                attacks,
                undefended=config["defense"]["name"] == "none",
                settings=plan.checks,
                clean_accuracy=None,
                device=device,
                progress=progress,
            )
            results.update(battery.to_dict())
            log_battery(run, battery, out, data.info.class_names)
            log.info(
                "verdict %s; worst-case robust accuracy %s",
                battery.verdict,
                [round(v, 3) for v in battery.worst_case_robust_accuracy()],
            )
        unwritten = record_results(run, ctx, results)
    raise_unrecorded(run, ctx, unwritten)
    log.info(
        "%s: clean accuracy %.4f on %d test images (%s)",
        run_name,
        clean.accuracy,
        results["n_test"],
        "cached weights" if trained.cache_hit else f"trained in {train_seconds:.1f}s",
    )
    return results
