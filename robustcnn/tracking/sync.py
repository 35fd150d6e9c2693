"""``robustcnn sync PATH...``: import jobs that finished while the tracking store was unreachable.

Why: a job keeps computing when the store fails under it (:class:`robustcnn.tracking.store.RunLogger`)
and leaves ``results.json`` (an audit: ``audit.json`` and ``model_card.json``), ``run.json`` (the run
it meant to log: experiment, name, tags, params) and ``config.json`` plus its plots in its output
folder. ``sync`` rebuilds the run from those files through the same metric mapping a live job uses
(:mod:`robustcnn.tracking.records`).

Idempotent, so it is safe to point at a whole ``multirun/`` tree: a job whose own run finished in
the store, or whose results an earlier sync imported (same ``results.json`` digest), is left
alone; every job ends up in the store exactly once. The partial run a failing store left behind
(RUNNING or FAILED) is marked FAILED and tagged with the run that replaced it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustcnn.errors import ConfigError, TrackingError
from robustcnn.hashing import file_sha256
from robustcnn.tracking.records import all_metric_rows, result_tags
from robustcnn.tracking.store import TrackingStore

log = logging.getLogger(__name__)

#: Tags that tie an imported run to the files it came from.
DIGEST_TAG = "robustcnn.results_sha256"
ORIGINAL_TAG = "robustcnn.original_run_id"
SOURCE_TAG = "robustcnn.synced_from"
#: What holds a folder's results: a job's results.json, else an audit's audit.json.
RESULTS_FILES = ("results.json", "audit.json")
#: Files an audit logs besides its results, imported as they are.
AUDIT_FILES = ("model_card.json",)


@dataclass(frozen=True)
class SyncOutcome:
    folder: Path
    status: str  # "imported" | "present" | "damaged"
    run_id: str | None
    detail: str

    def line(self) -> str:
        run = f" run {self.run_id}" if self.run_id else ""
        return f"{self.status:8s} {self.folder}{run} ({self.detail})"


def job_folders(paths: Sequence[str | Path]) -> list[Path]:
    """Every job or audit output folder under ``paths`` (run.json next to results.json or audit.json)."""
    folders: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError(
                f"{path} does not exist; pass a job's output folder (outputs/<date>/<time>) or a "
                "sweep's (multirun/<date>/<time>), as printed by the job"
            )
        if path.is_file():
            path = path.parent
        candidates = [path / "run.json", *path.rglob("run.json")]
        folders.update(c.parent for c in candidates if c.is_file() and _results_file(c.parent).is_file())
    return sorted(folders)


def _results_file(folder: Path) -> Path:
    """The folder's results: results.json (a job), else audit.json (an audit)."""
    found = [folder / name for name in RESULTS_FILES if (folder / name).is_file()]
    return found[0] if found else folder / RESULTS_FILES[0]


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _already_present(
    store: TrackingStore, experiment_id: str, original: str | None, digest: str
) -> str | None:
    """The id of a FINISHED run that already holds these results, else None."""
    if original and store.run_status(original) == "FINISHED":
        return original
    query = f"tags.`{DIGEST_TAG}` = '{digest}' and attributes.status = 'FINISHED'"
    synced = store.search_runs(experiment_id, query)
    return synced[0]["run_id"] if synced else None


def sync_folder(folder: Path, uri: str | None = None) -> SyncOutcome:
    """Import one job folder into ``uri`` (default: the store the job was meant for)."""
    results_file = _results_file(folder)
    try:
        results = _read_json(results_file)
        meta = _read_json(folder / "run.json")
        experiment = str(meta["experiment"])
        target = uri or str(meta["tracking_uri"])
    except (OSError, ValueError, KeyError) as exc:
        return SyncOutcome(folder, "damaged", None, f"unreadable {results_file.name}/run.json: {exc}")
    digest = file_sha256(results_file)
    store = TrackingStore.at(target)
    experiment_id = store.ensure_experiment(experiment)
    original = meta.get("run_id") or results.get("mlflow_run_id")
    present = _already_present(store, experiment_id, original, digest)
    if present is not None:
        return SyncOutcome(folder, "present", present, f"already in {target}")

    parent = meta.get("parent_run_id")
    if parent and store.run_status(parent) is None:
        parent = None  # the sweep's parent run is not in this store: import the job on its own
    tags = {
        **meta.get("tags", {}),
        **result_tags(results),
        DIGEST_TAG: digest,
        ORIGINAL_TAG: original or "",
        SOURCE_TAG: str(folder.resolve()),
    }
    with store.start_run(experiment, meta.get("run_name"), tags, experiment_id, parent) as run:
        run.log_params(meta.get("params", {}))
        run.log_metric_rows(all_metric_rows(results))
        if (folder / "config.json").is_file():
            run.log_text((folder / "config.json").read_text(), "config.json")
        for plot in sorted([*folder.glob("*.png"), *folder.glob("*.safetensors")]):
            run.log_artifact(plot, "plots")  # examples.safetensors: the kept examples the report draws
        for name in AUDIT_FILES:
            if (folder / name).is_file():
                run.log_text((folder / name).read_text(), name)
        imported = {**results, "mlflow_run_id": run.run_id, "synced_from_run_id": original}
        for name in dict.fromkeys(("results.json", results_file.name)):  # an audit's run holds both
            run.log_dict(imported, name)
    if run.lost is not None:
        raise TrackingError(
            f"the MLflow store {target} failed while importing {folder} ({run.lost}); "
            "run the same `robustcnn sync` again once it answers (imported jobs are not duplicated)"
        )
    _supersede(store, original, run.run_id)
    return SyncOutcome(folder, "imported", run.run_id, f"into {target}, experiment {experiment!r}")


def _supersede(store: TrackingStore, original: str | None, replacement: str) -> None:
    """Mark the partial run a failing store left behind as FAILED, pointing at its replacement."""
    if not original:
        return
    status = store.run_status(original)
    if status is None:
        return
    if status == "RUNNING":
        store.end_run(original, "FAILED")
    store.set_run_tag(original, "robustcnn.superseded_by", replacement)


def sync(paths: Sequence[str | Path], uri: str | None = None) -> list[SyncOutcome]:
    """Import every job folder under ``paths``; one outcome per folder, in path order."""
    folders = job_folders(paths)
    if not folders:
        raise ConfigError(
            f"no job or audit output folder (run.json next to results.json or audit.json) under "
            f"{', '.join(map(str, paths))}; pass the folder a job printed (results=<folder>/results.json)"
        )
    outcomes = []
    for folder in folders:
        outcome = sync_folder(folder, uri)
        log.info(outcome.line())
        outcomes.append(outcome)
    return outcomes
