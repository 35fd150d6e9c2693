"""Read-only access to the MLflow store for the dashboard: experiments, runs and their artifacts.

mlflow is reached only through :class:`robustcnn.tracking.store.TrackingStore` (the tracking package
is the only one that imports it), and lazily, so ``robustcnn --help`` never pays for it. Reading must
never create a store: a mistyped URI would otherwise leave an empty ``mlflow.db`` behind and produce an
empty report instead of an error that names the problem.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from robustcnn.errors import ReportError, RobustCNNError
from robustcnn.report.records import EXAMPLES_PNG, RunRecord

#: Runs fetched per page of ``search_runs`` (MLflow's own maximum per call is larger).
PAGE = 1000


def display_uri(uri: str) -> str:
    """The URI without credentials (``https://user:token@host`` must not end up in a shared page)."""
    parsed = urlparse(uri)
    if parsed.username or parsed.password:
        host = parsed.hostname or ""
        netloc = f"{host}:{parsed.port}" if parsed.port else host
        return parsed._replace(netloc=netloc).geturl()
    return uri


def local_store_path(uri: str) -> Path | None:
    """The file (sqlite) or folder (file store) behind a local URI; None for servers."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else parsed.path
        return Path(path) if path and path != ":memory:" else None
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" and uri:
        return Path(uri)
    return None


def check_store_exists(uri: str) -> None:
    """Raise a :class:`ReportError` naming the path when a local store is not there."""
    path = local_store_path(uri)
    if path is None:
        return
    exists = path.is_file() if urlparse(uri).scheme == "sqlite" else path.is_dir()
    if not exists:
        raise ReportError(
            f"no MLflow store at {path} (tracking URI {display_uri(uri)!r}); run a job first, "
            "or point --tracking-uri / MLFLOW_TRACKING_URI at the store the jobs logged to"
        )


@contextlib.contextmanager
def _store_errors(uri: str, what: str) -> Iterator[None]:
    """mlflow raises many exception types; the user gets one ReportError that says what failed."""
    try:
        yield
    except RobustCNNError:
        raise
    except Exception as exc:
        raise ReportError(
            f"cannot read the MLflow store {display_uri(uri)!r} ({what}): {exc}. "
            "Check --tracking-uri / MLFLOW_TRACKING_URI, or that the tracking server is running"
        ) from exc


def _client(uri: str) -> Any:
    """mlflow's client for the store (one per URI: :class:`robustcnn.tracking.store.TrackingStore`)."""
    from robustcnn.tracking.store import TrackingStore

    check_store_exists(uri)
    with _store_errors(uri, "opening the store"):
        return TrackingStore.at(uri).client


def experiments(uri: str) -> dict[str, str]:
    """Every active experiment of the store: ``{name: experiment_id}``."""
    client = _client(uri)
    found: dict[str, str] = {}
    token = None
    with _store_errors(uri, "listing experiments"):
        while True:
            page = client.search_experiments(max_results=PAGE, page_token=token)
            found.update({e.name: str(e.experiment_id) for e in page})
            token = page.token
            if not token:
                return found


def has_runs(uri: str, experiment_id: str) -> bool:
    with _store_errors(uri, "searching runs"):
        return bool(_client(uri).search_runs([experiment_id], max_results=1))


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment ``name``; a ReportError listing the existing ones when it is not there."""
    known = experiments(uri)
    if name not in known:
        listing = ", ".join(sorted(known)) or "none"
        raise ReportError(
            f"experiment {name!r} does not exist in the MLflow store {display_uri(uri)!r}; "
            f"existing experiments: {listing}. Pass one of them with --experiment, or omit it for all"
        )
    return known[name]


def runs(uri: str, experiment_id: str) -> list[RunRecord]:
    """Every active run of an experiment with its status, params, metrics and tags (no artifacts)."""
    client = _client(uri)
    records: list[RunRecord] = []
    token = None
    with _store_errors(uri, f"searching the runs of experiment {experiment_id}"):
        while True:
            page = client.search_runs([experiment_id], max_results=PAGE, page_token=token)
            for run in page:
                tags = dict(run.data.tags)
                records.append(
                    RunRecord(
                        run_id=run.info.run_id,
                        name=run.info.run_name or tags.get("mlflow.runName", ""),
                        status=run.info.status,
                        start_time=run.info.start_time,
                        tags=tags,
                        params=dict(run.data.params),
                        metrics=dict(run.data.metrics),
                    )
                )
            token = page.token
            if not token:
                return records


def attach_artifacts(uri: str, record: RunRecord, plots: tuple[str, ...] = (EXAMPLES_PNG,)) -> None:
    """Fill ``results``, ``config`` and the wanted ``plots/*.png`` of a run from its artifacts.

    A run without ``results.json`` (a sweep parent, a job that died after logging its config)
    keeps ``results=None`` and is skipped by the page.
    """
    client = _client(uri)
    with _store_errors(uri, f"reading the artifacts of run {record.run_id}"):
        root = {Path(f.path).name for f in client.list_artifacts(record.run_id)}
        with tempfile.TemporaryDirectory(prefix="robustcnn-report-") as tmp:
            for name, attr in (("results.json", "results"), ("config.json", "config")):
                if name in root:
                    local = client.download_artifacts(record.run_id, name, tmp)
                    setattr(record, attr, json.loads(Path(local).read_text()))
            if "plots" in root:
                for info in client.list_artifacts(record.run_id, "plots"):
                    name = Path(info.path).name
                    if not info.is_dir and name.endswith(".png") and name in plots:
                        local = client.download_artifacts(record.run_id, info.path, tmp)
                        record.images[name] = Path(local).read_bytes()
