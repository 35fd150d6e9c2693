"""Read-only access to the MLflow store for the dashboard: experiments, runs and their artifacts.

mlflow is reached only through :class:`robustcnn.tracking.store.TrackingStore` (the tracking package
is the only one that imports it), and lazily, so ``robustcnn --help`` never pays for it. Reading must
never create a store: a mistyped URI would otherwise leave an empty ``mlflow.db`` behind and produce an
empty report instead of an error that names the problem.
"""

from __future__ import annotations

import base64
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from robustcnn.errors import ReportError, RobustCNNError
from robustcnn.report.aligned import GRADIENTS_FILE, GradientSet
from robustcnn.report.examples import EXAMPLES_FILE, ExampleSet
from robustcnn.report.heatmaps import ATTRIBUTIONS_PNG, FACE_SALIENCY_PNG
from robustcnn.report.records import EXAMPLES_PNG, FACE_IMAGE_PREFIX, RunRecord

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


def attach_artifacts(uri: str, record: RunRecord, cache: Path | None = None) -> None:
    """Fill ``results``, ``config`` and the example grid of a finished run from its artifacts.

    A run without ``results.json`` (a sweep parent, a job that died after logging its config)
    keeps ``results=None`` and is skipped by the page. With ``cache`` (a folder of the report's own),
    what was read and drawn for a run is kept there and read back on the next build: a finished
    run's artifacts never change, so a report rebuilt after a sweep fetches only the new runs.
    """
    if cache is not None and _read_cached(cache, record):
        return
    client = _client(uri)
    with _store_errors(uri, f"reading the artifacts of run {record.run_id}"):
        root = {Path(f.path).name for f in client.list_artifacts(record.run_id)}
        with tempfile.TemporaryDirectory(prefix="robustcnn-report-") as tmp:
            for name, attr in (("results.json", "results"), ("config.json", "config")):
                if name in root:
                    local = client.download_artifacts(record.run_id, name, tmp)
                    setattr(record, attr, json.loads(Path(local).read_text()))
            listed = client.list_artifacts(record.run_id, "plots") if "plots" in root else []
            plots = {Path(info.path).name: info.path for info in listed}
            grid = _example_grid(client, record.run_id, plots, Path(tmp))
            if grid is not None:
                record.images[EXAMPLES_PNG] = grid
            if record.is_face_patch and "plots" in root:
                record.images.update(_face_images(client, record.run_id, plots, Path(tmp)))
            if ATTRIBUTIONS_PNG in plots:
                local = client.download_artifacts(record.run_id, plots[ATTRIBUTIONS_PNG], tmp)
                record.images[ATTRIBUTIONS_PNG] = Path(local).read_bytes()
            if GRADIENTS_FILE in plots:
                local = client.download_artifacts(record.run_id, plots[GRADIENTS_FILE], tmp)
                record.gradients = GradientSet.load(Path(local))
    if cache is not None and record.results is not None:
        _write_cached(cache, record)


def _example_grid(client: Any, run_id: str, plots: dict[str, str], tmp: Path) -> bytes | None:
    """The run's example grid: drawn from its kept examples, or the PNG an older run logged."""
    if EXAMPLES_FILE in plots:
        local = Path(client.download_artifacts(run_id, plots[EXAMPLES_FILE], str(tmp)))
        return ExampleSet.load(local).render_png(tmp / EXAMPLES_PNG).read_bytes()
    if EXAMPLES_PNG in plots:  # runs logged before the examples were kept as data
        return Path(client.download_artifacts(run_id, plots[EXAMPLES_PNG], str(tmp))).read_bytes()
    return None


#: At most this many patch PNGs of one face run are embedded (a full study has dozens).
MAX_FACE_PATCHES = 16


def _face_images(client: Any, run_id: str, plots: dict[str, str], tmp: Path) -> dict[str, bytes]:
    """A face run's patched faces, the recognizer's saliency on them and its patches as printed, keyed
    ``face/<path under plots>``."""
    wanted = [plots[name] for name in ("adversarial_faces.png", FACE_SALIENCY_PNG) if name in plots]
    if "patches" in plots:
        for goal in client.list_artifacts(run_id, plots["patches"]):
            if goal.is_dir:
                listed = client.list_artifacts(run_id, goal.path)
                wanted += [f.path for f in listed if f.path.endswith(".png")]
    found = {}
    for path in wanted[: 2 + MAX_FACE_PATCHES]:
        local = Path(client.download_artifacts(run_id, path, str(tmp)))
        found[FACE_IMAGE_PREFIX + path.removeprefix("plots/")] = local.read_bytes()
    return found


def _read_cached(cache: Path, record: RunRecord) -> bool:
    """Fill ``record`` from the report's cache; False when the run is not there (or unreadable)."""
    entry = cache / f"{record.run_id}.json"
    try:
        data = json.loads(entry.read_text())
        if data["results"].get("task") == "face_patch" and "images" not in data:
            return False  # cached before face images were kept: read the run again
        images = {name: base64.b64decode(text) for name, text in (data.get("images") or {}).items()}
        kept = _cached_gradients(cache, record.run_id)
        gradients = GradientSet.load(kept) if kept.is_file() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ReportError):
        return False
    record.results, record.config, record.gradients = data["results"], data.get("config"), gradients
    record.images.update(images)
    for image, png in _cached_images(cache, record.run_id).items():
        if png.is_file():
            record.images[image] = png.read_bytes()
    return True


def _cached_images(cache: Path, run_id: str) -> dict[str, Path]:
    """Where the report's cache keeps a run's images (the example grid's name predates the others')."""
    return {EXAMPLES_PNG: cache / f"{run_id}.png", ATTRIBUTIONS_PNG: cache / f"{run_id}.{ATTRIBUTIONS_PNG}"}


def _cached_gradients(cache: Path, run_id: str) -> Path:
    return cache / f"{run_id}.{GRADIENTS_FILE}"


def _write_cached(cache: Path, record: RunRecord) -> None:
    """Keep what was read for a finished run (the PNGs and data first: the JSON marks the entry complete)."""
    cache.mkdir(parents=True, exist_ok=True)
    for image, png in _cached_images(cache, record.run_id).items():
        if image in record.images:
            png.write_bytes(record.images[image])
    if record.gradients is not None:
        record.gradients.save(_cached_gradients(cache, record.run_id))
    entry = cache / f"{record.run_id}.json"
    partial = cache / f".{record.run_id}.json.tmp"
    images = {
        name: base64.b64encode(png).decode("ascii")
        for name, png in record.images.items()
        if name.startswith(FACE_IMAGE_PREFIX)
    }
    partial.write_text(json.dumps({"results": record.results, "config": record.config, "images": images}))
    partial.replace(entry)
