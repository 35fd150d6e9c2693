"""``robustcnn audit MODEL [overrides]``: load safely, validate, attack, judge, report, log; an exit code.

The order is the runner's: every check a user can fail (config, output folder, tracking store, data,
model file, shapes) runs before the first attack, so bad input costs seconds. ``audit.json`` and
``model_card.json`` are written before anything is logged to MLflow, so a store that goes away
loses nothing. Exit codes (a contract: release pipelines depend on them): 0 audited and the gate
passed (or no gate), 1 below the gate or the gate refused (black-box evidence only, unless
``audit.accept_black_box``), 3 unreliable or unchecked evaluation, 2 bad input; 2 wins over 3, 3 over 1.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robustcnn import __version__
from robustcnn.attacks import Attack
from robustcnn.batching import clean_accuracy
from robustcnn.config import config_float
from robustcnn.data import Dataset
from robustcnn.deployed import loading, prepare, sources
from robustcnn.deployed.card import model_card
from robustcnn.device import resolve_device, seed_everything, set_threads
from robustcnn.errors import ConfigError
from robustcnn.evaluation.battery import BatteryResult, BatterySettings, run_battery
from robustcnn.evaluation.settings import plan_attacks
from robustcnn.files import write_json
from robustcnn.jobs.inputs import bind_surrogates, load_data, to_container
from robustcnn.jobs.lifecycle import RunRecord, environment_info, write_run_files
from robustcnn.jobs.outputs import log_battery
from robustcnn.report.audit_page import write_report
from robustcnn.threat import ThreatModel
from robustcnn.tracking.records import audit_summary_rows
from robustcnn.tracking.store import TrackingStore, flatten

log = logging.getLogger(__name__)

EXIT_PASSED, EXIT_BELOW_GATE, EXIT_BAD_INPUT, EXIT_UNRELIABLE = 0, 1, 2, 3
ONNX_MODES = ("auto", "white_box", "black_box")


def compose_audit(overrides: Sequence[str]) -> dict[str, Any]:
    """The audit config with the user's overrides; composition errors become one-line ConfigErrors."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from robustcnn.config import compose

    try:
        cfg = compose(overrides, config_name="audit")
    except (HydraException, OmegaConfBaseException) as exc:
        message = " ".join(str(exc).split())[:400]
        raise ConfigError(f"bad override ({message}); see `robustcnn list` for the config groups") from exc
    return to_container(cfg)


@dataclass(frozen=True)
class AuditSettings:
    """The ``audit`` section, checked: how many images, the release gate, how the model file is read.

    The defaults are conf/audit.yaml's (a test holds them equal), so the Python API audits exactly
    as ``robustcnn audit`` does without composing a Hydra config.
    """

    n_samples: int = 1000
    min_robust_accuracy: float | None = None
    gate_eps: float | None = None
    normalization: Any = None
    allow_pickle: bool = False
    onnx: str = "auto"
    white_box_attacks: tuple[str, ...] = ("fgsm", "pgd", "apgd", "apgd_t", "square")
    black_box_attacks: tuple[str, ...] = ("square", "transfer")
    reference_eps_only: tuple[str, ...] = ("square",)
    survivors_only: tuple[str, ...] = ("square", "noise")
    accept_black_box: bool = False
    out_dir: str | None = None

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> AuditSettings:
        """Build from the ``audit`` config section; a wrong value fails naming ``audit.<key>``."""
        n = section.get("n_samples")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"audit.n_samples={n!r} must be a positive integer, e.g. audit.n_samples=1000")
        gate = section.get("min_robust_accuracy")
        if section.get("onnx") not in ONNX_MODES:
            raise ConfigError(
                f"audit.onnx={section.get('onnx')!r} is unknown; choose one of {', '.join(ONNX_MODES)}"
            )
        for flag in ("allow_pickle", "accept_black_box"):
            if not isinstance(section.get(flag), bool):
                raise ConfigError(f"audit.{flag}={section.get(flag)!r} must be true or false")
        for key, example in (("reference_eps_only", "[square]"), ("survivors_only", "[square,noise]")):
            if not isinstance(section.get(key), list):
                raise ConfigError(f"audit.{key} must be a list of attack names, e.g. {example} (or [])")
        for key in ("white_box_attacks", "black_box_attacks"):
            if not isinstance(section.get(key), list) or not section[key]:
                raise ConfigError(
                    f"audit.{key} must be a non-empty list of attack names, e.g. [fgsm,pgd,square]"
                )
        gate_eps = section.get("gate_eps")
        return cls(
            n_samples=n,
            min_robust_accuracy=None if gate is None else _number(gate, "audit.min_robust_accuracy", 0, 1),
            gate_eps=None if gate_eps is None else config_float(gate_eps, "audit.gate_eps", minimum=0.0),
            normalization=section.get("normalization"),
            allow_pickle=section["allow_pickle"],
            onnx=section["onnx"],
            white_box_attacks=tuple(section["white_box_attacks"]),
            black_box_attacks=tuple(section["black_box_attacks"]),
            reference_eps_only=tuple(section["reference_eps_only"]),
            survivors_only=tuple(section["survivors_only"]),
            accept_black_box=section["accept_black_box"],
            out_dir=section.get("out_dir"),
        )


def _number(value: Any, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= float(value) <= high):
        raise ConfigError(f"{key}={value!r} must be a number in [{low:g}, {high:g}]")
    return float(value)


def output_folder(config: dict[str, Any], name: str) -> Path:
    """Create (or reuse) the output folder now, with a clear error when it cannot be written."""
    chosen = config["audit"].get("out_dir")
    out = Path(chosen) if chosen else Path(config["paths"].get("reports_dir") or "reports") / "audit" / name
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the audit folder {out} ({exc.strerror}); set audit.out_dir"
        ) from exc
    if not os.access(out, os.W_OK):
        raise ConfigError(f"the audit folder {out} is not writable; set audit.out_dir to a writable folder")
    return out


def choose_attacks(attacks: Sequence[Attack], settings: AuditSettings, white_box: bool) -> list[Attack]:
    """The selected attacks the model allows: gradient attacks only when it exposes gradients."""
    key = "white_box_attacks" if white_box else "black_box_attacks"
    allowed = set(getattr(settings, key))
    chosen = [a for a in attacks if a.name in allowed and (white_box or not a.uses_gradients)]
    if not chosen:
        access = "white-box" if white_box else "black-box (no gradients)"
        raise ConfigError(
            f"none of the selected attacks {[a.name for a in attacks]} applies to this {access} model "
            f"(audit.{key} = {sorted(allowed)}); select some of them, "
            f"e.g. attack=[{','.join(sorted(allowed))}]"
        )
    return chosen


#: Why the gate does not pass on black-box evidence (audit.json's ``gate.refused``).
BLACK_BOX_REFUSAL = (
    "only black-box attacks ran (no gradients): the robust accuracy is an upper bound of unknown "
    "tightness; set audit.accept_black_box=true to accept it"
)


def gate_result(
    settings: AuditSettings, eps: Sequence[float], worst: Sequence[float], ref: float, evidence: str
) -> dict[str, Any]:
    """The release gate: the worst-case robust accuracy at the gate's eps against the minimum asked.

    On black-box evidence only the gate is refused (``passed: false``, with or without a minimum),
    unless ``audit.accept_black_box``: no release should pass on attacks that could not see gradients.
    """
    minimum = settings.min_robust_accuracy
    gate_eps = ref if settings.gate_eps is None else settings.gate_eps
    matches = [i for i, e in enumerate(eps) if math.isclose(e, gate_eps, abs_tol=1e-9)]
    if not matches:
        raise ConfigError(
            f"audit.gate_eps={gate_eps:g} is not one of threat.eps {list(eps)}; pick one of them"
        )
    accuracy = worst[matches[0]]
    refused = BLACK_BOX_REFUSAL if evidence == "black_box" and not settings.accept_black_box else None
    return {
        "min_robust_accuracy": minimum,
        "eps": gate_eps,
        "robust_accuracy": accuracy,
        "evidence": evidence,
        "refused": refused,
        "passed": False if refused else (None if minimum is None else accuracy >= float(minimum)),
    }


def exit_code(verdict: str, gate: dict[str, Any]) -> int:
    """3 when the evaluation cannot be trusted (a check failed) or was not checked; 1 when the gate
    failed or was refused; else 0."""
    if verdict in ("unreliable", "unchecked"):
        return EXIT_UNRELIABLE
    if gate["passed"] is False:
        return EXIT_BELOW_GATE
    return EXIT_PASSED


def fetch_model(source: str, store: TrackingStore, dst: Path) -> Path:
    """Download an MLflow model URI into ``dst``; return the model file inside it."""
    path = store.fetch_artifacts(source, dst)
    return path if path.is_file() else sources.model_file_in(path, source)


@dataclass
class AuditOutcome:
    """What an audit found: ``results`` (audit.json's contents), the battery, the model card."""

    results: dict[str, Any]
    battery: BatteryResult
    card: dict[str, Any]

    @property
    def verdict(self) -> str:
        return str(self.results["verdict"])

    @property
    def exit_code(self) -> int:
        return int(self.results["exit_code"])


@dataclass(frozen=True)
class AuditedModel:
    """The model an audit runs on: the file as loaded, where it came from, what its report calls it."""

    loaded: loading.LoadedModel
    source: str
    name: str
    arch: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


def audit_model(
    target: AuditedModel,
    data: Dataset,
    threat: ThreatModel,
    attacks: Sequence[Attack],
    settings: AuditSettings,
    *,
    checks: BatterySettings | None = None,
    device: torch.device | None = None,
    eval_batch_size: int = 1000,
    bind_surrogates: Callable[[list[Attack]], None] | None = None,
    progress: bool = False,
) -> AuditOutcome:
    """Validate the model against ``data``, attack it, judge the evaluation and the gate.

    No config, store or files: ``robustcnn audit`` and :func:`robustcnn.audit` both call this.
    ``bind_surrogates`` trains (or loads) the surrogate of each transfer attack chosen.
    """
    device = device or torch.device("cpu")
    n = min(settings.n_samples, int(data.y_test.shape[0]))
    x, y = data.x_test[:n], data.y_test[:n]
    prepared = prepare.prepare(
        target.loaded,
        data.info,
        x[: min(n, 64)],
        arch=target.arch,
        options=target.options,
        normalization=settings.normalization,
    )
    model = prepared.model.to(device)
    chosen = choose_attacks(attacks, settings, prepared.white_box)
    access = "white-box" if prepared.white_box else "black-box"
    names = [a.name for a in chosen]
    log.info("auditing %s (%s, %s) with %s", target.name, target.loaded.format, access, names)
    if bind_surrogates is not None:
        bind_surrogates(chosen)
    clean = clean_accuracy(model, x, y, eval_batch_size, device)
    battery = run_battery(
        model,
        x,
        y,
        threat,
        chosen,
        undefended=False,
        settings=checks or BatterySettings(),
        clean_accuracy=clean.accuracy,
        device=device,
        progress=progress,
        reference_only=settings.reference_eps_only if prepared.white_box else (),
        survivors_only=settings.survivors_only,
    )
    results = audit_results(target, prepared, data, n, battery, clean.accuracy, settings, device)
    card = model_card(results)
    results["model_card"] = card
    return AuditOutcome(results, battery, card)


def audit_results(
    target: AuditedModel,
    prepared: prepare.PreparedModel,
    data: Dataset,
    n: int,
    battery: BatteryResult,
    clean_accuracy: float,
    settings: AuditSettings,
    device: torch.device,
) -> dict[str, Any]:
    """audit.json's contents: the battery's results, the model, the gate and the exit code."""
    loaded = target.loaded
    worst = battery.worst_case_robust_accuracy()
    gate = gate_result(settings, list(battery.threat.eps), worst, battery.reference_eps, battery.evidence)
    return {
        "task": "audit",  # how ``robustcnn sync`` tells audit.json from a job's results.json
        **battery.to_dict(),
        "clean_accuracy": clean_accuracy,
        "model": {
            "name": target.name,
            "source": target.source,
            "path": str(loaded.path) if not sources.is_mlflow_uri(target.source) else target.source,
            "format": loaded.format,
            "sha256": loaded.sha256,
            "parameters": prepared.parameters,
            "input_shape": list(data.info.input_shape),
            "num_classes": data.info.num_classes,
            "arch": prepared.arch,
            "normalization": prepared.normalization,
        },
        "white_box": prepared.white_box,
        "notes": prepared.notes,
        "data": data.info.name,
        "data_identity": data.info.identity,
        "n_test": n,
        "device": str(device),
        "environment": environment_info(device),
        "gate": gate,
        "exit_code": exit_code(battery.verdict, gate),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_audit(
    source: str, overrides: Sequence[str] = (), progress: bool = False
) -> tuple[int, dict[str, Any]]:
    """``robustcnn audit``: compose the config, audit the model at ``source``, write files, log, report.

    Returns (exit code, audit.json contents).
    """
    started = time.perf_counter()
    config = compose_audit(overrides)
    settings = AuditSettings.from_mapping(config["audit"])
    name = sources.model_name(source)
    set_threads(config.get("threads"))
    seed_everything(int(config.get("seed", 0)))
    device = resolve_device(config.get("device", "auto"))
    tracking = config.get("tracking") or {}
    store = TrackingStore.resolve(tracking.get("uri"))
    store.check_writable()
    threat, attacks = plan_attacks(config)
    if threat is None:
        raise ConfigError("attack=[] selects no attack; an audit needs some, e.g. attack=[fgsm,pgd,square]")
    out = output_folder(config, name)
    data = load_data(config)
    threat.check_input_size(data.info.input_shape)
    with tempfile.TemporaryDirectory(prefix="robustcnn-audit-") as tmp:
        path = fetch_model(source, store, Path(tmp)) if sources.is_mlflow_uri(source) else Path(source)
        loaded = loading.load_model_file(path, allow_pickle=settings.allow_pickle, onnx_mode=settings.onnx)
    model_section = config.get("model") or {}
    outcome = audit_model(
        AuditedModel(loaded, source, name, model_section.get("arch"), model_section.get("options") or {}),
        data,
        threat,
        attacks,
        settings,
        checks=BatterySettings.from_mapping(config.get("checks")),
        device=device,
        eval_batch_size=int(config["eval"].get("batch_size", 1000)),
        bind_surrogates=lambda chosen: bind_surrogates(chosen, config, data, device, progress),
        progress=progress,
    )
    results = outcome.results
    results["seed"] = int(config.get("seed", 0))
    results["out_dir"] = str(out)
    results["audit_seconds"] = time.perf_counter() - started
    write_json(out, "audit.json", results)
    write_json(out, "model_card.json", outcome.card)
    log_to_mlflow(store, tracking, config, outcome, out, data.info.class_names)
    write_json(out, "audit.json", results)  # now with the MLflow run id
    write_report(out, results, config, outcome.card, store=store.uri)
    return outcome.exit_code, results


def log_to_mlflow(
    store: TrackingStore,
    tracking: dict[str, Any],
    config: dict[str, Any],
    outcome: AuditOutcome,
    out: Path,
    class_names: tuple[str, ...],
) -> None:
    """The audit as an MLflow run (experiment ``audit``): params, metrics, examples, card and results."""
    results, battery, card = outcome.results, outcome.battery, outcome.card
    model = results["model"]
    tags = {
        "robustcnn.version": __version__,
        "robustcnn.audit": True,
        "model": model["name"],
        "model_format": model["format"],
        "model_sha256": model["sha256"],
        "white_box": results["white_box"],
        "data": results["data"],
        "defense": "(audited)",
    }
    experiment = tracking.get("experiment") or "audit"
    run_name = tracking.get("run_name") or f"audit-{model['name']}"
    with store.start_run(experiment, run_name, tags) as run:
        results["mlflow_run_id"] = run.run_id
        params = flatten({k: v for k, v in config.items() if k != "hydra"})
        params.update({f"model_file.{k}": v for k, v in model.items() if not isinstance(v, (dict, list))})
        write_run_files(out, run, config, RunRecord(experiment, run_name, None, tags, params))
        run.log_params(params)
        run.log_dict(config, "config.json")
        run.log_metric_rows(audit_summary_rows(results))
        log_battery(run, battery, out, class_names)
        run.log_dict(card, "model_card.json")
        run.log_dict({**results, "mlflow_run_id": run.run_id}, "results.json")
        run.log_dict({**results, "mlflow_run_id": run.run_id}, "audit.json")
    if run.lost is not None:
        # the verdict stands (audit.json, model_card.json and report.html are written first); only
        # the store's copy is incomplete, so this is a warning, not a change of the exit code
        log.warning(
            "the MLflow store %s failed while logging the audit (%s); the files in %s are complete; "
            "once the store is back, `robustcnn sync %s` imports them",
            store.uri,
            run.lost,
            out,
            out,
        )


def output_folder_of(results: dict[str, Any]) -> Path:
    return Path(results["out_dir"])


def gate_word(gate: Mapping[str, Any]) -> str:
    """none (no minimum), passed, failed, or refused (black-box evidence only)."""
    if gate.get("refused"):
        return "refused"
    if gate["min_robust_accuracy"] is None:
        return "none"
    return "passed" if gate["passed"] else "failed"


def summary_line(results: dict[str, Any], out: Path | None = None) -> str:
    gate = results["gate"]
    parts = [
        f"verdict={results['verdict'].replace(' ', '_')}",
        f"evidence={results['evidence']}",
        f"clean_accuracy={results['clean_accuracy']:.4f}",
        f"robust_accuracy@{results['reference_eps']:g}={results['reference_robust_accuracy']:.4f}",
        f"gate={gate_word(gate)}",
        f"white_box={str(results['white_box']).lower()}",
        f"format={results['model']['format']}",
        f"exit_code={results['exit_code']}",
    ]
    if out is not None:
        parts += [f"audit={out / 'audit.json'}", f"report={out / 'report.html'}"]
    parts.append(f"run_id={results.get('mlflow_run_id')}")
    return " ".join(parts)
