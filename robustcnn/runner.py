"""One job: config -> data -> model -> (cached) training -> evaluation -> MLflow + results.json.

Why this order: every check a user can fail (device, tracking store, cache folder, dataset files,
model name) runs before any training, so a bad input costs seconds, not an epoch; the MLflow run
is opened before training so that a job that dies is recorded as FAILED rather than missing.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robustcnn import __version__
from robustcnn.attacks import Attack, Transfer, attack_specs, build_attack
from robustcnn.battery import BatteryResult, BatterySettings, run_battery
from robustcnn.cache import WeightCache
from robustcnn.data import Dataset, load_dataset
from robustcnn.defenses import build_defense
from robustcnn.device import resolve_device, seed_everything, set_threads
from robustcnn.errors import ConfigError
from robustcnn.evaluation import clean_accuracy
from robustcnn.hashing import code_version, job_key
from robustcnn.models import count_parameters
from robustcnn.resume import JOB_KEY_TAG, find_finished
from robustcnn.sweep import SweepLink
from robustcnn.threat import ThreatModel
from robustcnn.tracking import (
    check_store_writable,
    ensure_experiment,
    flatten,
    resolve_tracking_uri,
    start_run,
)
from robustcnn.trained import obtain_model, resolve_defense
from robustcnn.training import TrainConfig

log = logging.getLogger(__name__)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolve interpolations into a plain dict; a missing mandatory value becomes a ConfigError."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "a value"
        raise ConfigError(
            f"config value {key} is missing or invalid ({exc.msg if hasattr(exc, 'msg') else exc}); "
            f"set it on the command line, e.g. {key}=..."
        ) from exc


def load_data(config: dict[str, Any]) -> Dataset:
    section = dict(config["data"])
    name = section.pop("name", None)
    if not name:
        raise ConfigError("the data config has no 'name'; pick a preset such as data=mnist5k")
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


def plan_attacks(config: dict[str, Any]) -> tuple[ThreatModel | None, list[Attack]]:
    """Validate the threat model and build every selected attack before any training starts."""
    specs = attack_specs(config.get("attack"))
    if not specs:
        return None, []
    threat = ThreatModel.from_mapping(config.get("threat") or {})
    eval_cfg = config.get("eval") or {}
    common = {
        "seed": int(config.get("seed", 0)),
        "batch_size": int(eval_cfg.get("attack_batch_size", 500)),
        "amp": bool(eval_cfg.get("amp", False)),
        "keep_examples": int(eval_cfg.get("keep_examples", 8)),
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
    rows: dict[str, list[float | None]] = {
        f"robust_accuracy/{k}": battery.full_curve(k) for k in battery.attacks
    }
    rows.update(
        {
            f"attack_success_rate/{k}": battery.full_curve(k, r.success_rate())
            for k, r in battery.attacks.items()
        }
    )
    rows["worst_case_robust_accuracy"] = battery.worst_case_robust_accuracy()
    scalars = {
        "reference_robust_accuracy": battery.reference_robust_accuracy(),
        **{f"timing/{k}_images_per_s": r.images_per_s() for k, r in battery.attacks.items()},
        **{f"check/{c.name}": (-1.0 if c.passed is None else float(c.passed)) for c in battery.checks},
    }
    metrics = [(name, value, 0) for name, value in scalars.items()]
    for name, curve in rows.items():
        metrics += [(name, curve[i], i) for i in range(len(eps)) if curve[i] is not None]
        metrics += [
            (f"{name}/eps_{value:.4g}", curve[i], 0) for i, value in enumerate(eps) if curve[i] is not None
        ]
    run.log_metric_rows(metrics)
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


def write_results(out: Path | None, results: dict[str, Any]) -> None:
    """results.json next to the job's output: kept even when the tracking store is gone."""
    if out is not None:
        (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str))


def run_job(
    cfg: DictConfig | dict[str, Any],
    output_dir: str | Path | None = None,
    progress: bool = True,
    sweep: SweepLink | None = None,
    job_tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one job end to end and return its results (also written to ``output_dir/results.json``).

    A job whose identical config (and code) already finished in the same experiment is not run
    again unless ``force=true``: its results are linked (``reused_from``) and returned.
    ``sweep`` puts the run under a sweep's parent run; ``job_tags`` (Hydra's job number and
    overrides) make the sweep's cells tell apart in the MLflow UI.
    """
    started = time.perf_counter()
    config = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    build_defense(resolve_defense(config["defense"]))  # bad defense settings fail before any work
    set_threads(config.get("threads"))
    seed = int(config.get("seed", 0))
    seed_everything(seed)
    device = resolve_device(config.get("device", "auto"))
    tracking = config.get("tracking") or {}
    experiment = tracking.get("experiment") or "robustcnn"
    uri = sweep.tracking_uri if sweep else resolve_tracking_uri(tracking.get("uri"))
    check_store_writable(uri)
    if bool(config["training"].get("use_cache", True)):
        WeightCache(config["paths"]["cache_dir"]).ensure_writable()
    TrainConfig.from_mapping(config["training"])  # validated before any data is loaded
    threat, attacks = plan_attacks(config)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    key = job_key(config)
    experiment_id = sweep.experiment_id if sweep else ensure_experiment(uri, experiment)
    if not config.get("force", False):
        previous = find_finished(uri, experiment_id, key)
        if previous is not None:
            log.info(
                "identical job already finished in run %s: reused (force=true runs it again)",
                previous["reused_from"],
            )
            write_results(out, previous)
            return previous
    data = load_data(config)
    if threat is not None:
        threat.check_input_size(data.info.input_shape)

    run_name = (
        tracking.get("run_name") or f"{config['model']['name']}-{config['defense']['name']}-{data.info.name}"
    )
    tags = {
        "robustcnn.version": __version__,
        "model": config["model"]["name"],
        "defense": config["defense"]["name"],
        "data": data.info.name,
        JOB_KEY_TAG: key,
        "robustcnn.code_version": code_version(),
        **(job_tags or {}),
    }
    with start_run(
        uri,
        experiment,
        run_name,
        tags,
        experiment_id=experiment_id,
        parent_run_id=sweep.parent_run_id if sweep else None,
    ) as run:
        params = flatten({k: v for k, v in config.items() if k != "hydra"})
        params.update(flatten(data.info.identity, prefix="data_identity."))
        run.log_params(params)
        run.log_dict(config, "config.json")

        trained = obtain_model(config, data, device, progress=progress)
        if trained.train is not None:
            for epoch, metrics in enumerate(trained.train.history, start=1):
                run.log_metrics({f"train/{k}": v for k, v in metrics.items() if k != "epoch"}, step=epoch)

        eval_cfg = config.get("eval") or {}
        x_test, y_test = data.x_test, data.y_test
        if eval_cfg.get("max_samples"):
            x_test, y_test = x_test[: int(eval_cfg["max_samples"])], y_test[: int(eval_cfg["max_samples"])]
        amp = bool(config["training"].get("amp", True))
        clean = clean_accuracy(
            trained.model, x_test, y_test, int(eval_cfg.get("batch_size", 1000)), device, amp
        )

        train_seconds = trained.train.seconds if trained.train else trained.meta.get("train_seconds")
        results: dict[str, Any] = {
            "clean_accuracy": clean.accuracy,
            "model": config["model"]["name"],
            "data": data.info.name,
            "defense": config["defense"]["name"],
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
            "mlflow_run_id": run.run_id,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        run.log_metrics(
            {
                "clean_accuracy": clean.accuracy,
                "eval_images_per_s": clean.images_per_s,
                **({"train_seconds": train_seconds} if train_seconds is not None else {}),
            }
        )
        run.set_tags({"cache_hit": trained.cache_hit, "weights_key": trained.key})
        report = results["defense_report"]
        run.log_metrics(
            {
                f"defense/{k}": v
                for k, v in report.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        if threat is not None:
            bind_surrogates(attacks, config, data, device, progress)
            n_attack = int(eval_cfg.get("attack_samples") or y_test.shape[0])
            battery = run_battery(
                trained.model,
                x_test[:n_attack],
                y_test[:n_attack],
                threat,
                attacks,
                undefended=config["defense"]["name"] == "none",
                settings=BatterySettings.from_mapping(config.get("checks")),
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
        results["job_seconds"] = time.perf_counter() - started  # wall time of the job, bookkeeping included
        write_results(out, results)
        run.log_dict(results, "results.json")
    log.info(
        "%s: clean accuracy %.4f on %d test images (%s)",
        run_name,
        clean.accuracy,
        results["n_test"],
        "cached weights" if trained.cache_hit else f"trained in {train_seconds:.1f}s",
    )
    return results
