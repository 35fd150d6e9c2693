"""Sweeps: one MLflow parent run per ``robustcnn run -m``, one child run per job, a summary at the end.

Why a Hydra callback in the parent process: it runs before any launcher starts a worker, so it
can create the tracking store, the experiment and the parent run once (a sqlite store first
touched by several workers at once breaks during its schema migration, and a server puts runs of
a not-yet-created experiment silently into Default). The workers learn the parent through the
environment (inherited by joblib, submitit and Ray workers) and, for workers on other machines,
through a small marker file in the sweep folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from robustcnn import __version__
from robustcnn.errors import RobustCNNError
from robustcnn.report import warmup
from robustcnn.sweeps.compose_once import compose_each_job_once, forget_composed
from robustcnn.sweeps.launchers import prepare_launcher
from robustcnn.tracking.pending import REASON_TAG, PendingClose, defer_close
from robustcnn.tracking.store import TrackingStore
from robustcnn.tracking.sweep_link import ENV_EXPERIMENT_ID, ENV_PARENT_RUN, MARKER_FILE, SweepLink

log = logging.getLogger(__name__)


class SweepFailed(SystemExit):
    """A sweep that ran but in which some job did not finish: exit code 1 (bad input stays 2)."""

    def __init__(self) -> None:
        super().__init__(1)


def job_tags(hydra_cfg: Any) -> dict[str, str]:
    """Hydra's job number and overrides as run tags: the MLflow compare view's columns."""
    return {
        "robustcnn.job_num": str(hydra_cfg.job.num),
        "robustcnn.overrides": " ".join(hydra_cfg.overrides.task),
        "robustcnn.job_id": str(hydra_cfg.job.id),
    }


def defense_label(hydra_cfg: Any) -> str | None:
    """The defense as the user chose it: the preset's name plus the job's own ``defense.*`` overrides.

    Why: the config's ``defense.name`` is the defense's type, so ``prune_robust`` and
    ``prune_robust_no_finetune`` (or ``defense.sparsity=0.5,0.9``) would share one name in the
    sweep summary, the report's charts and the run names.
    """
    choice = hydra_cfg.runtime.choices.get("defense")
    if not choice:
        return None
    task = [o.lstrip("+~") for o in hydra_cfg.overrides.task]
    own = [o.split(".", 1)[1] for o in task if o.startswith("defense.")]
    return " ".join([str(choice), *own])


def count_jobs(config: DictConfig) -> int | None:
    """How many jobs the basic sweeper will launch (None when it cannot tell, e.g. other sweepers)."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(arguments)
        batches = BasicSweeper.split_arguments(parsed, None)
        return sum(len(batch) for batch in batches)
    except Exception:  # a custom sweeper or syntax we do not model: no total, not an error
        return None


class SweepCallback(Callback):
    """Registered in conf/hydra/default.yaml; Hydra calls it around every multirun."""

    def __init__(self) -> None:
        self.link: SweepLink | None = None
        self.total: int | None = None
        self.done = 0
        self.owner_pid: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        uri = TrackingStore.resolve(OmegaConf.select(config, "tracking.uri")).uri
        experiment = OmegaConf.select(config, "tracking.experiment") or "robustcnn"
        sweep_dir = Path(config.hydra.sweep.dir)
        self.total = count_jobs(config)
        try:
            self.link = open_sweep(uri, experiment, sweep_dir, list(config.hydra.overrides.task), self.total)
        except RobustCNNError as exc:
            # Hydra turns a callback's exception into a warning and starts the jobs anyway: stop here,
            # before any job, with the one-line error (SystemExit passes through Hydra)
            print(f"robustcnn: error: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        self.owner_pid = os.getpid()
        log.info("sweep parent run %s in experiment %s (%s)", self.link.parent_run_id, experiment, uri)
        prepare_launcher(config)  # after open_sweep: hands its environment to Ray tasks on other machines
        if str(OmegaConf.select(config, "hydra.launcher._target_") or "").endswith(".BasicLauncher"):
            compose_each_job_once()  # the jobs run in this process: the check's configs serve the launch

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # Hydra's sweeper keeps every job's JobReturn until the sweep ends (parallel launchers send
        # it back to the parent); its two configs are most of it (measured: ~0.2 MB a job, 9 MB of
        # the parent's peak after 50 jobs). Nothing reads them after this callback: drop them.
        if job_return is not None:
            job_return.cfg = None
            job_return.hydra_cfg = None
        # runs in the job's process: counts only where jobs share the sweep's process (basic launcher);
        # parallel workers get a pickled copy of this callback, whose count would be their own
        if self.link is None or os.getpid() != self.owner_pid:
            return
        self.done += 1
        total = f"/{self.total}" if self.total else ""
        print(f"sweep: {self.done}{total} jobs done", file=sys.stderr)
        if computed(OmegaConf.select(config, "hydra.runtime.output_dir")):
            warmup.start()  # the end-of-sweep report's plotly loads while the next jobs compute

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        forget_composed()
        if self.link is None:
            return
        reports_dir = OmegaConf.select(config, "paths.reports_dir") or "reports"
        experiment = OmegaConf.select(config, "tracking.experiment") or "robustcnn"
        closed = end_parent(self.link, Path(config.hydra.sweep.dir), status=None)
        if closed is None:  # the store did not answer: the close is deferred (already said)
            self.link = None
            return
        status, cells = closed
        report = Path(reports_dir) / experiment / "index.html"
        if cells and all(c["reused"] for c in cells) and report.is_file():
            print(f"report: {report} (unchanged: every job was reused)", file=sys.stderr)
        else:
            build_sweep_report(self.link.tracking_uri, experiment, Path(reports_dir))
        self.link = None
        if status != "FINISHED":  # a launcher that returns failed jobs instead of raising
            unfinished = sum(c["status"] != "FINISHED" for c in cells)
            print(
                f"robustcnn: error: {unfinished} of {len(cells)} sweep jobs did not finish; "
                f"see {Path(config.hydra.sweep.dir) / 'sweep_summary.json'}",
                file=sys.stderr,
            )
            raise SweepFailed


def computed(output_dir: str | None) -> bool:
    """Whether the job in ``output_dir`` computed its results (a reused job links earlier ones)."""
    try:
        results = json.loads((Path(str(output_dir)) / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(results, dict) and not results.get("reused_from")


def open_sweep(
    uri: str, experiment: str, sweep_dir: Path, overrides: list[str], total: int | None
) -> SweepLink:
    """Create the store, the experiment and the parent run; tell the workers through env and marker."""
    store = TrackingStore.at(uri)
    experiment_id = store.ensure_experiment(experiment)
    store.reap_orphaned_runs(experiment_id)  # a killed earlier sweep left its runs RUNNING
    parent = store.create_run(
        experiment_id,
        run_name=f"sweep {sweep_dir.name}",
        tags={
            "robustcnn.sweep": "true",
            "robustcnn.version": __version__,
            "robustcnn.sweep_dir": str(sweep_dir.resolve()),
            "robustcnn.overrides": " ".join(overrides),
            **({"robustcnn.jobs": total} if total else {}),
        },
    )
    link = SweepLink(uri, experiment_id, parent)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ[ENV_PARENT_RUN] = parent
    os.environ[ENV_EXPERIMENT_ID] = experiment_id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / MARKER_FILE).write_text(json.dumps(asdict(link)))
    _OPEN[parent] = (link, sweep_dir)
    return link


#: Parent runs opened by this process and not yet closed (closed on failure by the CLI).
_OPEN: dict[str, tuple[SweepLink, Path]] = {}


def sweep_cells(link: SweepLink, sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job: its child run (or the finished run it reused) and its headline numbers."""
    children = {
        r["run_id"]: r
        for r in TrackingStore.at(link.tracking_uri).search_runs(
            link.experiment_id, f"tags.`mlflow.parentRunId` = '{link.parent_run_id}'"
        )
    }
    cells: list[dict[str, Any]] = []
    seen: set[str] = set()
    for results_file in sorted(sweep_dir.glob("*/results.json"), key=lambda p: _job_number(p.parent.name)):
        results = json.loads(results_file.read_text())
        run_id = results.get("reused_from") or results.get("mlflow_run_id")
        seen.add(run_id)
        cells.append(_cell(results_file.parent.name, run_id, "FINISHED", results))
    for run_id, run in children.items():
        if run_id not in seen:  # a child that never wrote results: failed or killed
            cells.append(_cell(run["tags"].get("robustcnn.job_num", "?"), run_id, run["status"], {}))
    return cells


def _job_number(name: str) -> int:
    return int(name) if name.isdigit() else 1 << 30


def _cell(job: str, run_id: str | None, status: str, results: dict[str, Any]) -> dict[str, Any]:
    return {
        "job": job,
        "run_id": run_id,
        "status": status,
        "reused": bool(results.get("reused_from")),
        "model": results.get("model_label") or results.get("model"),
        "defense": results.get("defense_label") or results.get("defense"),
        "epoch_cost": (results.get("defense_report") or {}).get("epoch_cost_ratio"),
        "train_seconds": results.get("train_seconds"),
        "clean_accuracy": results.get("clean_accuracy"),
        "reference_eps": results.get("reference_eps"),
        "reference_robust_accuracy": results.get("reference_robust_accuracy"),
        "verdict": results.get("verdict"),
    }


def summary_table(cells: list[dict[str, Any]]) -> str:
    """The sweep summary as a Markdown table (readable in the MLflow UI's artifact view)."""
    columns = (
        "job", "model", "defense", "clean", "robust@ref", "epoch cost", "train s", "verdict", "status", "run"
    )  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for c in cells:
        values = (
            c["job"],
            c["model"],
            c["defense"],
            _fmt(c["clean_accuracy"]),
            _fmt(c["reference_robust_accuracy"]),
            None if c.get("epoch_cost") is None else f"{c['epoch_cost']:.1f}x",
            None if c.get("train_seconds") is None else f"{c['train_seconds']:.0f}",
            c["verdict"],
            c["status"] + (" (reused)" if c["reused"] else ""),
            c["run_id"],
        )
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


def close_sweep(
    link: SweepLink, sweep_dir: Path, status: str | None, reason: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Write the summary artifact on the parent and end it (FAILED if any job did not finish).

    ``reason`` (why the sweep stopped early) becomes the parent's ``robustcnn.close_reason`` tag.
    """
    cells = sweep_cells(link, sweep_dir)
    if status is None:
        status = "FINISHED" if cells and all(c["status"] == "FINISHED" for c in cells) else "FAILED"
    store = TrackingStore.at(link.tracking_uri)
    summary = {"parent_run_id": link.parent_run_id, "status": status, "cells": cells}
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2))  # kept if the store fails
    try:
        if reason:
            store.set_run_tag(link.parent_run_id, REASON_TAG, reason)
        store.log_text(link.parent_run_id, json.dumps(summary, indent=2), "sweep_summary.json")
        store.log_text(link.parent_run_id, summary_table(cells), "sweep_summary.md")
    finally:
        store.end_run(link.parent_run_id, status)
        _OPEN.pop(link.parent_run_id, None)
    print(
        f"sweep: {len(cells)} jobs, status {status}, summary {sweep_dir / 'sweep_summary.json'}",
        file=sys.stderr,
    )
    return status, cells


def jobs_started(sweep_dir: Path) -> bool:
    """Whether any job of the sweep started (Hydra creates ``<sweep_dir>/<job number>/`` first)."""
    return sweep_dir.is_dir() and any(p.is_dir() and p.name.isdigit() for p in sweep_dir.iterdir())


#: How long a sweep waits at its end for a store that does not answer, and between two tries.
CLOSE_WAIT_S = 10.0
CLOSE_RETRY_S = 2.0


def end_parent(
    link: SweepLink, sweep_dir: Path, status: str | None, reason: str | None = None
) -> tuple[str, list[dict[str, Any]]] | None:
    """Close the sweep's parent run; a store that does not answer is waited for, then the close deferred.

    Why: a parent left RUNNING looks like a sweep still at work. The store gets :data:`CLOSE_WAIT_S`
    to come back (a server restarting); after that (or at Ctrl-C) the close is written down
    (:mod:`robustcnn.tracking.pending`) and the next robustcnn process that reaches the store ends the
    run as FAILED (or ``status``), tagged with why. Returns what :func:`close_sweep` returns, or None
    when the close was deferred.
    """
    deadline = time.monotonic() + CLOSE_WAIT_S
    while True:
        try:
            return close_sweep(link, sweep_dir, status, reason)
        except RobustCNNError as exc:
            error = exc
        try:
            if time.monotonic() + CLOSE_RETRY_S > deadline:
                break
            time.sleep(CLOSE_RETRY_S)
        except KeyboardInterrupt:  # a stop while waiting: defer now, the stop is raised again later
            break
    _defer_parent(link, sweep_dir, status, reason, error)
    return None


def _defer_parent(
    link: SweepLink, sweep_dir: Path, status: str | None, reason: str | None, error: RobustCNNError
) -> None:
    """Write the parent's close down for the next process that reaches the store, and say so."""
    why = f"{reason}; " if reason else ""
    close = PendingClose(
        link.tracking_uri,
        link.parent_run_id,
        "FAILED" if status in (None, "FINISHED") else status,
        f"{why}the tracking store did not answer when the sweep ended: {error}",
    )
    _OPEN.pop(link.parent_run_id, None)
    try:
        kept = defer_close(close)
        where = f"the next robustcnn command that reaches the store closes it as {close.status} ({kept})"
    except RobustCNNError as exc:
        where = f"it stays RUNNING until a later sweep on this machine marks it KILLED ({exc})"
    print(
        f"robustcnn: warning: the sweep's parent run {link.parent_run_id} was not closed ({error}); "
        f"{where}; every job's results.json is under {sweep_dir} "
        f"(`robustcnn sync {sweep_dir}` imports any the store missed)",
        file=sys.stderr,
    )


def close_open_sweeps(status: str, reason: str | None = None) -> None:
    """End parent runs this process opened when the sweep died before Hydra's end callback.

    A sweep that never started a job (a bad override is found only after the parent run exists)
    leaves no run behind: its parent is deleted rather than left FAILED with nothing under it.
    ``reason`` says why the sweep stopped (the parent's ``robustcnn.close_reason`` tag).
    """
    forget_composed()
    for link, sweep_dir in list(_OPEN.values()):
        if not jobs_started(sweep_dir):
            try:
                TrackingStore.at(link.tracking_uri).delete_run(link.parent_run_id)
                _OPEN.pop(link.parent_run_id, None)
                continue
            except RobustCNNError as exc:
                log.warning("could not delete the empty sweep run %s: %s", link.parent_run_id, exc)
        end_parent(link, sweep_dir, status, reason)


def build_sweep_report(uri: str, experiment: str, reports_dir: Path) -> None:
    """The HTML dashboard for the sweep's experiment; a report problem never fails the sweep."""
    try:
        from robustcnn.report import build_report
    except ImportError:  # pragma: no cover - the report package ships with robustcnn
        return
    try:
        for path in build_report(uri, experiment, reports_dir):
            print(f"report: {path}", file=sys.stderr)
    except RobustCNNError as exc:
        print(f"robustcnn: warning: the report was not written: {exc}", file=sys.stderr)
