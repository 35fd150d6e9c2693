"""MLflow tracking: URI precedence, params, metrics, artifacts, failure status, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from robustcnn.errors import TrackingError
from robustcnn.tracking.store import TrackingStore, flatten, resolve_tracking_uri


def test_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    monkeypatch.chdir(tmp_path)  # a relative sqlite path is made absolute, so every worker opens one file
    expected = f"sqlite:///{tmp_path.resolve() / 'env.db'}"
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == expected


def test_flatten_nested_config() -> None:
    flat = flatten({"a": {"b": 1, "c": {"d": "x"}}, "eps": [0.1, 0.2], "n": None})
    assert flat == {"a.b": 1, "a.c.d": "x", "eps": "[0.1, 0.2]", "n": None}


@pytest.fixture()
def store_uri(tmp_path: Path, empty_store: Path) -> str:
    shutil.copy(empty_store, tmp_path / "m.db")
    return f"sqlite:///{tmp_path / 'm.db'}"


def test_run_logs_params_metrics_and_json(store_uri: str) -> None:
    uri = store_uri
    params = {f"p{i}": i for i in range(150)}  # more than one mlflow batch
    params["long"] = "x" * 7000
    with TrackingStore.at(uri).start_run("exp", "name", {"t": "v"}) as run:
        run.log_params(params)
        run.log_metrics({"clean_accuracy": 0.5, "skipped": None})
        run.log_metrics({"curve": 0.1}, step=3)
        run.log_dict({"clean_accuracy": 0.5}, "results.json")
    stored = TrackingStore.at(uri).read_run(run.run_id)
    assert stored["status"] == "FINISHED"
    assert stored["params"]["p149"] == "149" and stored["params"]["long"].endswith("[cut]")
    assert stored["metrics"]["clean_accuracy"] == 0.5 and "skipped" not in stored["metrics"]
    assert stored["tags"]["t"] == "v"
    assert TrackingStore.at(uri).download_json(run.run_id, "results.json") == {"clean_accuracy": 0.5}


def test_failure_inside_marks_run_failed(store_uri: str) -> None:
    uri = store_uri
    with pytest.raises(RuntimeError), TrackingStore.at(uri).start_run("exp") as run:
        raise RuntimeError("boom")
    assert TrackingStore.at(uri).read_run(run.run_id)["status"] == "FAILED"


def test_unwritable_store_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with (
        pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI"),
        TrackingStore.at(f"sqlite:///{blocker}/sub/m.db").start_run("exp"),
    ):
        pass
