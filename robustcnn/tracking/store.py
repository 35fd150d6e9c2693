"""The MLflow store: one :class:`TrackingStore` per URI, one client, one error mapping.

Why one object: the tracking store is the one place results outlive a process, so its rules live
together: which URI wins (``MLFLOW_TRACKING_URI`` > config > mlflow's own sqlite default in the
working directory), how a nested config becomes params, and how failures become one clear
:class:`~robustcnn.errors.TrackingError` instead of a traceback from deep inside mlflow. Only the
``robustcnn.tracking`` package imports mlflow (an import-linter contract in pyproject.toml holds it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from robustcnn.errors import TrackingError
from robustcnn.files import nearest_existing
from robustcnn.interrupts import hold_interrupts, raise_if_requested
from robustcnn.tracking import pending
from robustcnn.tracking.schema import open_client

log = logging.getLogger(__name__)

T = TypeVar("T")

#: MLflow limits a param value to 6000 characters; longer values are cut with a marker.
MAX_PARAM_LENGTH = 6000
#: MLflow's log_batch accepts at most 100 params per call.
PARAM_BATCH = 100
#: MLflow's log_batch accepts at most 1000 entries (metrics, params and tags) and 100 tags per call.
METRIC_BATCH = 1000
TAG_BATCH = 100


def resolve_tracking_uri(configured: str | None = None, workdir: str | os.PathLike[str] | None = None) -> str:
    """Return the tracking URI to use: the environment variable, then the config, then sqlite in workdir."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return absolute_uri(env_uri)
    if configured:
        return absolute_uri(str(configured))
    base = Path(workdir) if workdir is not None else Path.cwd()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def absolute_uri(uri: str) -> str:
    """A relative sqlite path made absolute, so workers started elsewhere open the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


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


def _atomic(uri: str) -> contextlib.AbstractContextManager[None]:
    """Hold Ctrl-C / SIGTERM during one call to a database store; a server's calls stay interruptible.

    Why: a KeyboardInterrupt raised inside a SQLAlchemy transaction can leave a pooled sqlite
    connection holding the database lock, and every later write of the process (ending the job's
    run as KILLED, closing the sweep's parent) then waits out the busy timeout and fails, so a
    stopped sweep hung for minutes and left its runs RUNNING. The stop stays recorded and is raised
    at the next safe point (:func:`robustcnn.interrupts.raise_if_requested`). A call to a tracking
    server holds no lock here, and it can take minutes of retries: Ctrl-C must still cut it short.
    """
    if urlparse(uri).scheme in ("http", "https", "databricks"):
        return contextlib.nullcontext()
    return hold_interrupts()


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
    ``results.json``; the job then says how to import it (``robustcnn sync``). The client API
    (not mlflow's process-global "active run") keeps a dead store from leaking into the next job.

    Why it buffers: every store call is a transaction (~10-30 ms on sqlite, a round trip on a
    server). Params, metrics and tags wait in memory until :meth:`flush` (called when the run's
    params are recorded and when the run ends) and go out in as few ``log_batch`` calls as MLflow's
    per-call limits allow.
    """

    def __init__(self, client: Any, run_id: str, experiment_id: str, uri: str) -> None:
        self._client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.uri = uri
        self.lost: str | None = None
        self._params: dict[str, str] = {}
        self._metrics: list[Any] = []
        self._tags: dict[str, str] = {}

    def _call(self, what: str, action: Callable[[], object]) -> None:
        if self.lost is not None:
            return
        try:
            with _atomic(self.uri):
                action()
        except Exception as exc:  # mlflow raises many types (MlflowException, requests errors, ...)
            self.lost = f"{what}: {type(exc).__name__}: {_one_line(exc)}"
            log.warning(
                "the MLflow store %s failed while %s; the job goes on and keeps its results on disk",
                self.uri,
                self.lost,
            )

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._params.update({k: _param_value(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.log_metric_rows([(k, v, step or 0) for k, v in metrics.items()])

    def log_metric_rows(self, rows: Sequence[tuple[str, float | None, int]]) -> None:
        """Many ``(key, value, step)`` metrics (step: the eps index of a curve); ``None`` is dropped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), now, int(step)) for k, v, step in rows if v is not None]

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._tags.update({k: _param_value(v) for k, v in tags.items()})

    def flush(self) -> None:
        """Send the buffered params, metrics and tags in as few ``log_batch`` calls as the limits allow."""
        from mlflow.entities import Param, RunTag

        params = [Param(k, v) for k, v in self._params.items()]
        tags = [RunTag(k, v) for k, v in self._tags.items()]
        metrics = self._metrics
        self._params, self._tags, self._metrics = {}, {}, []
        while params or tags or metrics:
            some_params, some_tags = params[:PARAM_BATCH], tags[:TAG_BATCH]
            some_metrics = metrics[: METRIC_BATCH - len(some_params) - len(some_tags)]
            params, tags, metrics = params[PARAM_BATCH:], tags[TAG_BATCH:], metrics[len(some_metrics) :]
            send = functools.partial(
                self._client.log_batch, self.run_id, metrics=some_metrics, params=some_params, tags=some_tags
            )
            self._call("logging params, metrics and tags", send)

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
        """Flush what is buffered, then mark the run FINISHED / FAILED / KILLED."""
        self.flush()
        self._call(f"ending the run as {status}", lambda: self._client.set_terminated(self.run_id, status))


def owner_tags() -> dict[str, str]:
    """Which process owns a run: lets a later sweep tell a crashed run from one still running."""
    return {"robustcnn.host": socket.gethostname(), "robustcnn.pid": str(os.getpid())}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrackingStore:
    """One MLflow store (a URI): one client, and every failure mapped to one :class:`TrackingError`.

    Get it with :meth:`at` (one object per URI in a process, so its client and mlflow's engine are
    made once) or :meth:`resolve` (the URI as ``robustcnn run`` picks it). Every method either
    returns what the store said or raises a :class:`TrackingError` that names the store, what was
    being done and the usual fix; only :class:`RunLogger` swallows failures (a job outlives its store).
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client: Any = None

    @staticmethod
    @functools.lru_cache(maxsize=32)
    def at(uri: str) -> TrackingStore:
        """The store at ``uri`` (the same object for the same URI within a process)."""
        return TrackingStore(uri)

    @classmethod
    def resolve(cls, configured: str | None = None) -> TrackingStore:
        """The store ``robustcnn run`` logs to: MLFLOW_TRACKING_URI, else ``configured``, else ./mlflow.db."""
        return cls.at(resolve_tracking_uri(configured))

    @property
    def client(self) -> Any:
        """mlflow's ``MlflowClient`` for this store (mlflow ships no type information for it)."""
        if self._client is None:
            logging.getLogger("alembic").setLevel(logging.WARNING)
            mlflow = _mlflow()  # first: its settings (above) must be in place when it is imported
            make_client = functools.partial(mlflow.tracking.MlflowClient, self.uri)
            # a store another process is creating is waited for, not fatal (tracking/schema.py)
            self._client = self._call("opening the store", lambda: open_client(self.uri, make_client))
        return self._client

    def _call(self, what: str, action: Callable[[], T]) -> T:
        try:
            with _atomic(self.uri):
                return action()
        except TrackingError:
            raise
        except Exception as exc:  # mlflow raises many types (MlflowException, OperationalError, ...)
            raise self._error(what, exc) from exc

    def _error(self, what: str, exc: Exception) -> TrackingError:
        return TrackingError(
            f"cannot use MLflow store {self.uri!r} ({what}): {_one_line(exc)}. "
            "Check MLFLOW_TRACKING_URI / tracking.uri, or that the tracking server is running"
        )

    def check_writable(self) -> None:
        """Fail early, with the fix, when a local store cannot be written (before any training starts)."""
        check_store_writable(self.uri)

    def ensure_experiment(self, experiment: str) -> str:
        """Create the store (schema) and the experiment if needed; return the experiment id.

        A sweep calls this in its parent process before any worker starts: a sqlite store first
        touched by several processes at once can break during its schema migration. The store
        answered, so runs earlier processes could not close are ended here too.
        """
        self.check_writable()

        def find_or_create() -> str:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                try:
                    return str(self.client.create_experiment(experiment))
                except Exception:  # several jobs started together: another one created it first
                    found = self.client.get_experiment_by_name(experiment)
                    if found is None:
                        raise
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return str(found.experiment_id)

        experiment_id = self._call(f"experiment {experiment!r}", find_or_create)
        self.close_deferred_runs()  # the store answers: end what an earlier process could not
        return experiment_id

    def close_deferred_runs(self) -> list[str]:
        """End the runs earlier processes could not close while this store was down; return their ids.

        Each is ended with the status its process chose (a sweep's parent: FAILED) and tagged with
        the reason (:data:`robustcnn.tracking.pending.REASON_TAG`). A run that is no longer RUNNING
        (closed since, or deleted) is only forgotten. Why here: every process that writes to a store
        calls :meth:`ensure_experiment` first, so the first one after the store is back does it.
        """
        closed = []
        for close in pending.pending_closes(self.uri):
            try:
                if self.run_status(close.run_id) == "RUNNING":
                    self.set_run_tag(close.run_id, pending.REASON_TAG, close.reason)
                    self.end_run(close.run_id, close.status)
                    closed.append(close.run_id)
            except TrackingError as exc:
                log.warning("the deferred close of run %s waits for the next try: %s", close.run_id, exc)
                continue
            pending.forget(close)
        if closed:
            log.warning("closed %d run(s) an earlier process left open: %s", len(closed), ", ".join(closed))
        return closed

    def create_run(self, experiment_id: str, run_name: str | None, tags: Mapping[str, Any]) -> str:
        """Open a run that outlives this call (a sweep's parent); end it with :meth:`end_run`."""
        all_tags = {**owner_tags(), **{k: _param_value(v) for k, v in tags.items()}}
        run = self._call(
            "creating a run", lambda: self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        )
        return str(run.info.run_id)

    def end_run(self, run_id: str, status: str) -> None:
        """Mark a run FINISHED / FAILED / KILLED."""
        self._call(f"ending run {run_id}", lambda: self.client.set_terminated(run_id, status=status))

    def delete_run(self, run_id: str) -> None:
        """Delete a run (a sweep's parent that never got a job)."""
        self._call(f"deleting run {run_id}", lambda: self.client.delete_run(run_id))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Attach a text artifact to a run that is not the one being logged (the sweep summary)."""
        self._call(
            f"writing {artifact_file} to run {run_id}",
            lambda: self.client.log_text(run_id, text, artifact_file),
        )

    def set_run_tag(self, run_id: str, key: str, value: str) -> None:
        """Tag a run that is not the one being logged (e.g. a run replaced by ``robustcnn sync``)."""
        self._call(f"tagging run {run_id}", lambda: self.client.set_tag(run_id, key, value))

    def search_runs(self, experiment_id: str, filter_string: str = "") -> list[dict[str, Any]]:
        """Runs of an experiment matching an MLflow filter: id, status, tags, metrics, start time."""
        runs = self._call(
            "searching runs",
            lambda: self.client.search_runs([experiment_id], filter_string=filter_string, max_results=5000),
        )
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

    def reap_orphaned_runs(self, experiment_id: str) -> list[str]:
        """Mark RUNNING runs whose owning process on this host is gone as KILLED; return their ids.

        A job killed with SIGKILL cannot end its own run; the next sweep on the same store does it,
        so an interrupted run never looks finished (or still running) in the UI. Runs owned by other
        hosts are left alone: their process cannot be checked from here.
        """
        host = socket.gethostname()
        reaped = []
        for run in self.search_runs(experiment_id, "attributes.status = 'RUNNING'"):
            tags = run["tags"]
            pid = tags.get("robustcnn.pid", "")
            if tags.get("robustcnn.host") == host and pid.isdigit() and not _process_alive(int(pid)):
                self.end_run(run["run_id"], "KILLED")
                reaped.append(run["run_id"])
        if reaped:
            log.warning("marked %d interrupted run(s) as KILLED: %s", len(reaped), ", ".join(reaped))
        return reaped

    @contextlib.contextmanager
    def start_run(
        self,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        experiment_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> Iterator[RunLogger]:
        """Open a run; a failure inside marks it FAILED, Ctrl-C KILLED, a normal end FINISHED.

        In a sweep the parent process has created the experiment and passes its id (workers never
        create experiments, see :meth:`ensure_experiment`) and the parent run's id. The caller checks
        :attr:`RunLogger.lost` afterwards: a store that failed mid-run does not stop the job.
        """
        raise_if_requested()  # a sweep told to stop starts no new run
        self.check_writable()
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if experiment_id is None:
            experiment_id = self.ensure_experiment(experiment)
        run_id = self.create_run(experiment_id, run_name, all_tags)
        logger = RunLogger(self.client, run_id, str(experiment_id), self.uri)
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

    def read_run(self, run_id: str) -> dict[str, Any]:
        """A run's status, params, metrics, tags and experiment (tests and reports read it)."""
        run = self._call(f"reading run {run_id}", lambda: self.client.get_run(run_id))
        return {
            "status": run.info.status,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "tags": dict(run.data.tags),
            "experiment_id": run.info.experiment_id,
        }

    def run_status(self, run_id: str) -> str | None:
        """A run's status (FINISHED, RUNNING, ...), or None when this store has no such run."""
        try:
            return str(self.client.get_run(run_id).info.status)
        except Exception as exc:  # MlflowException says which; a store that is gone raises others
            if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise self._error(f"reading run {run_id}", exc) from exc

    def download_json(self, run_id: str, artifact_file: str) -> dict[str, Any]:
        """A JSON artifact of a run (e.g. ``results.json``)."""
        with tempfile.TemporaryDirectory() as tmp:
            local = self._call(
                f"reading {artifact_file} of run {run_id}",
                lambda: self.client.download_artifacts(run_id, artifact_file, tmp),
            )
            loaded: dict[str, Any] = json.loads(Path(local).read_text())
            return loaded

    def fetch_artifacts(self, artifact_uri: str, dst: Path) -> Path:
        """Download ``runs:/...`` or ``models:/...`` into ``dst`` (a model to audit); return the local path.

        Raises :class:`TrackingError` naming the URI when the run, model or version does not exist.
        """
        mlflow = _mlflow()
        from mlflow.exceptions import MlflowException

        _ = self.client  # mlflow opens the store itself below: a new one is made safely here first
        try:
            mlflow.set_tracking_uri(self.uri)
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst)))
        except (MlflowException, OSError) as exc:
            raise TrackingError(
                f"cannot fetch {artifact_uri} from the MLflow store {self.uri} ({_one_line(exc)}); check the "
                "run id or the registered model's name and version, and tracking.uri / MLFLOW_TRACKING_URI"
            ) from exc
