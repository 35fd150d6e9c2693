"""Everything that talks to MLflow. No other module imports mlflow.

Why one module: the tracking store is the one place results outlive a process, so its rules live
together: which URI wins (``MLFLOW_TRACKING_URI`` > config > mlflow's own sqlite default in the
working directory), how a nested config becomes params, and how failures become one clear
:class:`~robustcnn.errors.TrackingError` instead of a traceback from deep inside mlflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from robustcnn.errors import TrackingError
from robustcnn.files import nearest_existing
from robustcnn.interrupts import raise_if_requested

log = logging.getLogger(__name__)

#: MLflow limits a param value to 6000 characters; longer values are cut with a marker.
MAX_PARAM_LENGTH = 6000
#: mlflow.log_params accepts at most 100 params per call.
PARAM_BATCH = 100
#: MLflow's log_batch accepts at most 1000 metrics per call.
METRIC_BATCH = 1000


def resolve_tracking_uri(configured: str | None = None, workdir: str | os.PathLike[str] | None = None) -> str:
    """Return the tracking URI to use: the environment variable, then the config, then sqlite in workdir."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    if configured:
        return str(configured)
    base = Path(workdir) if workdir is not None else Path.cwd()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def check_store_writable(uri: str) -> None:
    """Fail early, with the fix, when a local store cannot be written (before any training starts)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https", "databricks"):
        return  # a server: reachability is checked when the run starts
    if parsed.scheme == "sqlite":
        target = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else Path(parsed.path)
        folder = target.parent
    elif parsed.scheme in ("", "file"):
        folder = Path(parsed.path if parsed.scheme == "file" else uri)
    else:
        return
    probe_dir = nearest_existing(folder)
    if (
        not probe_dir.is_dir()
        or not os.access(probe_dir, os.W_OK)
        or (folder.exists() and not os.access(folder, os.W_OK))
    ):
        raise TrackingError(
            f"the MLflow tracking store {uri!r} is not writable ({folder} cannot be written); "
            "run from a writable directory, or set MLFLOW_TRACKING_URI / tracking.uri to a writable store"
        )


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested mapping into ``{"a.b.c": value}`` (lists become JSON strings)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        else:
            flat[name] = value
    return flat


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    if len(text) > MAX_PARAM_LENGTH:
        text = text[: MAX_PARAM_LENGTH - 12] + "...[cut]"
    return text


def _mlflow():
    # no progress bars or migration chatter in users' terminals and CI logs
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # mlflow retries a request to a tracking server 7 times with a doubling back-off (minutes of
    # silence when the server is gone); 3 retries still ride out a restart, and the job keeps its
    # results on disk either way (RunLogger). Users may set these variables themselves.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    import mlflow  # imported lazily: it costs ~1 s and only tracking needs it

    return mlflow


def _one_line(exc: BaseException, limit: int = 300) -> str:
    return " ".join(str(getattr(exc, "message", exc)).split())[:limit]


class RunLogger:
    """A handle on one open MLflow run: params, metrics, tags and artifacts, by run id.

    Why it never raises: the store can go away in the middle of a job (a tracking server restarted,
    a network drop). The computation is worth more than the logging, so the first failed call is
    remembered in :attr:`lost`, later calls are skipped, and the job finishes and writes its
    ``results.json``; the runner then says how to import it (``robustcnn sync``). The client API
    (not mlflow's process-global "active run") keeps a dead store from leaking into the next job.
    """

    def __init__(self, client: Any, run_id: str, experiment_id: str, uri: str) -> None:
        self._client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.uri = uri
        self.lost: str | None = None

    def _call(self, what: str, action: Any) -> None:
        if self.lost is not None:
            return
        try:
            action()
        except Exception as exc:  # mlflow raises many types (MlflowException, requests errors, ...)
            self.lost = f"{what}: {type(exc).__name__}: {_one_line(exc)}"
            log.warning(
                "the MLflow store %s failed while %s; the job goes on and keeps its results on disk",
                self.uri,
                self.lost,
            )

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), PARAM_BATCH):
            batch = items[start : start + PARAM_BATCH]
            self._call("logging params", lambda b=batch: self._client.log_batch(self.run_id, params=b))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.log_metric_rows([(k, v, step or 0) for k, v in metrics.items()])

    def log_metric_rows(self, rows: Sequence[tuple[str, float | None, int]]) -> None:
        """Many ``(key, value, step)`` metrics in one store round-trip (curves: step = eps index).

        Why: one call per eps costs a store transaction each (~30 ms on sqlite), which adds up to
        a second per job in a sweep; a batch is one. ``None`` values (not measured) are skipped.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for k, v, step in rows if v is not None]
        for start in range(0, len(metrics), METRIC_BATCH):
            batch = metrics[start : start + METRIC_BATCH]
            self._call("logging metrics", lambda b=batch: self._client.log_batch(self.run_id, metrics=b))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, _param_value(v)) for k, v in tags.items()]
        self._call("setting tags", lambda: self._client.log_batch(self.run_id, tags=items))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Write a JSON artifact (e.g. ``results.json``) into the run."""
        self.log_text(json.dumps(data, indent=2, sort_keys=True, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(
            f"writing {artifact_file}", lambda: self._client.log_text(self.run_id, text, artifact_file)
        )

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._call(
            f"uploading {Path(path).name}",
            lambda: self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path),
        )

    def end(self, status: str) -> None:
        self._call(f"ending the run as {status}", lambda: self._client.set_terminated(self.run_id, status))


def mlflow_module() -> Any:
    """The mlflow module, imported on first use (for the report's store reader)."""
    return _mlflow()


def owner_tags() -> dict[str, str]:
    """Which process owns a run: lets a later sweep tell a crashed run from one still running."""
    return {"robustcnn.host": socket.gethostname(), "robustcnn.pid": str(os.getpid())}


def _unreachable(uri: str, what: str, exc: Exception) -> TrackingError:
    return TrackingError(
        f"cannot use MLflow store {uri!r} ({what}): {exc}. "
        "Check MLFLOW_TRACKING_URI / tracking.uri, or that the tracking server is running"
    )


def _client(uri: str) -> Any:
    return _mlflow().tracking.MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, experiment: str) -> str:
    """Create the store (schema) and the experiment if needed; return the experiment id.

    A sweep calls this in its parent process before any worker starts: a sqlite store first
    touched by several processes at once can break during its schema migration.
    """
    check_store_writable(uri)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        client = _client(uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                client.restore_experiment(found.experiment_id)
            return str(found.experiment_id)
        return str(client.create_experiment(experiment))
    except Exception as exc:  # mlflow raises many types (MlflowException, OperationalError, ...)
        raise _unreachable(uri, f"experiment {experiment!r}", exc) from exc


def create_run(uri: str, experiment_id: str, run_name: str, tags: Mapping[str, Any]) -> str:
    """Open a run that outlives this call (a sweep's parent); end it with :func:`end_run`."""
    try:
        run = _client(uri).create_run(
            experiment_id,
            run_name=run_name,
            tags={**owner_tags(), **{k: _param_value(v) for k, v in tags.items()}},
        )
    except Exception as exc:
        raise _unreachable(uri, "creating a run", exc) from exc
    return str(run.info.run_id)


def end_run(uri: str, run_id: str, status: str) -> None:
    """Mark a run FINISHED / FAILED / KILLED."""
    try:
        _client(uri).set_terminated(run_id, status=status)
    except Exception as exc:
        raise _unreachable(uri, f"ending run {run_id}", exc) from exc


def delete_run(uri: str, run_id: str) -> None:
    """Delete a run (a sweep's parent that never got a job)."""
    try:
        _client(uri).delete_run(run_id)
    except Exception as exc:
        raise _unreachable(uri, f"deleting run {run_id}", exc) from exc


def log_run_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    """Attach a text artifact to a run that is not the active one (the sweep summary)."""
    try:
        _client(uri).log_text(run_id, text, artifact_file)
    except Exception as exc:
        raise _unreachable(uri, f"writing {artifact_file} to run {run_id}", exc) from exc


def search_runs(uri: str, experiment_id: str, filter_string: str = "") -> list[dict[str, Any]]:
    """Runs of an experiment matching an MLflow filter: id, status, tags, metrics."""
    try:
        runs = _client(uri).search_runs([experiment_id], filter_string=filter_string, max_results=5000)
    except Exception as exc:
        raise _unreachable(uri, "searching runs", exc) from exc
    return [
        {
            "run_id": r.info.run_id,
            "status": r.info.status,
            "tags": dict(r.data.tags),
            "metrics": dict(r.data.metrics),
            "start_time": r.info.start_time,
        }
        for r in runs
    ]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphaned_runs(uri: str, experiment_id: str) -> list[str]:
    """Mark RUNNING runs whose owning process on this host is gone as KILLED; return their ids.

    A job killed with SIGKILL cannot end its own run; the next sweep on the same store does it,
    so an interrupted run never looks finished (or still running) in the UI. Runs owned by other
    hosts are left alone: their process cannot be checked from here.
    """
    host = socket.gethostname()
    reaped = []
    for run in search_runs(uri, experiment_id, "attributes.status = 'RUNNING'"):
        tags = run["tags"]
        pid = tags.get("robustcnn.pid", "")
        if tags.get("robustcnn.host") == host and pid.isdigit() and not _process_alive(int(pid)):
            end_run(uri, run["run_id"], "KILLED")
            reaped.append(run["run_id"])
    if reaped:
        log.warning("marked %d interrupted run(s) as KILLED: %s", len(reaped), ", ".join(reaped))
    return reaped


@contextlib.contextmanager
def start_run(
    uri: str,
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
) -> Iterator[RunLogger]:
    """Open a run on the store at ``uri``; a failure inside marks the run FAILED, Ctrl-C KILLED.

    In a sweep the parent process has created the experiment and passes its id (workers never
    create experiments, see :func:`ensure_experiment`) and the parent run's id. The caller checks
    :attr:`RunLogger.lost` afterwards: a store that failed mid-run does not stop the job.
    """
    raise_if_requested()  # a sweep told to stop starts no new run
    check_store_writable(uri)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    all_tags = {**owner_tags(), **{k: _param_value(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if experiment_id is None:
        experiment_id = ensure_experiment(uri, experiment)
    try:
        client = _client(uri)
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    except Exception as exc:  # mlflow raises many types (MlflowException, OperationalError, ...)
        raise _unreachable(uri, f"experiment {experiment!r}", exc) from exc
    logger = RunLogger(client, run.info.run_id, str(experiment_id), uri)
    status = "FAILED"
    try:
        yield logger
        raise_if_requested()  # a stop discarded inside a callback still ends the run as KILLED
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        logger.end(status)


def read_run(uri: str, run_id: str) -> dict[str, Any]:
    """Return a finished run's params, metrics and tags (used by tests and reports)."""
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    return {
        "status": run.info.status,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
        "experiment_id": run.info.experiment_id,
    }


def fetch_artifacts(uri: str, artifact_uri: str, dst: Path) -> Path:
    """Download ``runs:/...`` or ``models:/...`` into ``dst`` (a model to audit); return the local path.

    Raises :class:`TrackingError` naming the URI when the run, model or version does not exist.
    """
    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException

    try:
        mlflow.set_tracking_uri(uri)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        message = " ".join(str(getattr(exc, "message", exc)).split())[:300]
        raise TrackingError(
            f"cannot fetch {artifact_uri} from the MLflow store {uri} ({message}); check the run id or the "
            "registered model's name and version, and tracking.uri / MLFLOW_TRACKING_URI"
        ) from exc


def download_json_artifact(uri: str, run_id: str, artifact_file: str) -> dict[str, Any]:
    """Fetch a JSON artifact of a run (e.g. ``results.json``)."""
    mlflow = _mlflow()
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_file, dst_path=tmp)
        return json.loads(Path(local).read_text())


def get_run_status(uri: str, run_id: str) -> str | None:
    """A run's status (FINISHED, RUNNING, ...), or None when this store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(uri).get_run(run_id).info.status)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise _unreachable(uri, f"reading run {run_id}", exc) from exc
    except Exception as exc:
        raise _unreachable(uri, f"reading run {run_id}", exc) from exc


def set_run_tag(uri: str, run_id: str, key: str, value: str) -> None:
    """Tag a run that is not the one being logged (e.g. a run replaced by ``robustcnn sync``)."""
    try:
        _client(uri).set_tag(run_id, key, value)
    except Exception as exc:
        raise _unreachable(uri, f"tagging run {run_id}", exc) from exc
