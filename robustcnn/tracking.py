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
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from robustcnn.errors import TrackingError

log = logging.getLogger(__name__)

#: MLflow limits a param value to 6000 characters; longer values are cut with a marker.
MAX_PARAM_LENGTH = 6000
#: mlflow.log_params accepts at most 100 params per call.
PARAM_BATCH = 100


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
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
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
    import mlflow  # imported lazily: it costs ~1 s and only tracking needs it

    return mlflow


class RunLogger:
    """A thin handle on one active MLflow run: params, metrics, tags and artifacts."""

    def __init__(self, run: Any) -> None:
        self._run = run
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow = _mlflow()
        items = [(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), PARAM_BATCH):
            mlflow.log_params(dict(items[start : start + PARAM_BATCH]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            _mlflow().log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        _mlflow().set_tags({k: _param_value(v) for k, v in tags.items()})

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Write a JSON artifact (e.g. ``results.json``) into the run."""
        _mlflow().log_text(json.dumps(data, indent=2, sort_keys=True, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        _mlflow().log_text(text, artifact_file)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        _mlflow().log_artifact(str(path), artifact_path=artifact_path)


@contextlib.contextmanager
def start_run(
    uri: str,
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[RunLogger]:
    """Open a run in ``experiment`` on the store at ``uri``; a failure inside marks the run FAILED."""
    check_store_writable(uri)
    mlflow = _mlflow()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=run_name, tags=dict(tags or {}))
    except Exception as exc:  # mlflow raises many types (MlflowException, OperationalError, ...)
        raise TrackingError(
            f"cannot open MLflow store {uri!r} (experiment {experiment!r}): {exc}. "
            "Check MLFLOW_TRACKING_URI / tracking.uri, or that the tracking server is running"
        ) from exc
    status = "FAILED"
    try:
        yield RunLogger(run)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)


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


def download_json_artifact(uri: str, run_id: str, artifact_file: str) -> dict[str, Any]:
    """Fetch a JSON artifact of a run (e.g. ``results.json``)."""
    mlflow = _mlflow()
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_file, dst_path=tmp)
        return json.loads(Path(local).read_text())
